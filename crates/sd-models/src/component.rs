//! The networks a model holds, named once: their folders in the diffusers
//! layout and their weight files' stems.

/// The networks a model directory holds, with their weight-file stems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    TextEncoder,
    /// SDXL's second text encoder (CLIPTextModelWithProjection); FLUX's
    /// T5 encoder.
    TextEncoder2,
    Unet,
    /// A diffusion transformer (FLUX).
    Transformer,
    Vae,
}

impl Component {
    pub fn dir(self) -> &'static str {
        match self {
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Unet => "unet",
            Component::Transformer => "transformer",
            Component::Vae => "vae",
        }
    }

    pub(crate) fn stem(self) -> &'static str {
        match self {
            Component::TextEncoder | Component::TextEncoder2 => "model",
            Component::Unet | Component::Transformer | Component::Vae => "diffusion_pytorch_model",
        }
    }
}
