//! The LoRA-capable layers of a loaded network, registered by their
//! canonical paths as the network loads (an adapter's keys are resolved
//! against them).

use std::collections::HashMap;

/// What a LoRA-capable module is: its path's network and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    Linear,
    Conv {
        kernel: i64,
        stride: i64,
        padding: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleShape {
    pub kind: ModuleKind,
    pub input: i64,
    pub output: i64,
}

/// The LoRA-capable modules of a loaded network, by canonical path
/// (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
/// `text_encoder.encoder.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    pub modules: HashMap<String, ModuleShape>,
}

impl ModuleIndex {
    pub fn merge(&mut self, other: &ModuleIndex) {
        self.modules
            .extend(other.modules.iter().map(|(k, v)| (k.clone(), *v)));
    }

    /// The networks (path prefixes before the first `.`) present.
    pub fn networks(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .modules
            .keys()
            .filter_map(|k| k.split_once('.').map(|(n, _)| n.to_string()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}
