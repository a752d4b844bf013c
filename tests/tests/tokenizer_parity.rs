//! Token ids equal transformers' CLIPTokenizer on a corpus of edge cases, for
//! both tokenizer formats (vocab.json + merges.txt, and tokenizer.json).

#![allow(clippy::unwrap_used)]

mod common;

use sd_models::ModelDir;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<i64>,
}

fn check(model: &str) {
    let dir = common::model(model);
    let tok = ModelDir::open(&dir).unwrap().load_tokenizer().unwrap();
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_tokens.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 30, "corpus has {} prompts", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let got = tok.encode(&case.prompt).unwrap();
        assert_eq!(got.len(), 77);
        if got != case.ids {
            failures.push(format!(
                "{:?}\n  got  {:?}\n  want {:?}",
                case.prompt, got, case.ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{model}: {} prompts differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sd1_vocab_merges_tokenizer_matches_transformers() {
    check("sd1-tiny");
}

#[test]
fn sd2_tokenizer_json_matches_transformers() {
    check("sd2-tiny");
}

#[test]
fn pad_tokens_follow_the_model() {
    let sd1 = ModelDir::open(common::model("sd1-tiny"))
        .unwrap()
        .load_tokenizer()
        .unwrap();
    let sd2 = ModelDir::open(common::model("sd2-tiny"))
        .unwrap()
        .load_tokenizer()
        .unwrap();
    // SD 1.x pads with <|endoftext|> (49407), SD 2.x with "!" (id 0).
    assert_eq!(sd1.pad_id(), 49407);
    assert_eq!(sd2.pad_id(), 0);
    assert_eq!(sd1.encode("").unwrap()[..3], [49406, 49407, 49407]);
    assert_eq!(sd2.encode("").unwrap()[..3], [49406, 49407, 0]);
}

/// The default model's tokenizer (a BPE the project learned from emoji
/// names, in CLIP's format) gives transformers' ids on every prompt it was
/// trained with and on text it was not.
#[test]
fn the_default_models_learned_tokenizer_matches_transformers() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/emoji");
    let tok = ModelDir::open(&dir).unwrap().load_tokenizer().unwrap();
    let mut prompts: Vec<String> = std::fs::read_to_string(dir.join("training/captions.tsv"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split('\t').nth(1))
        .flat_map(|n| {
            [
                n.to_string(),
                format!("an emoji of {n}"),
                format!("A {} EMOJI!", n),
            ]
        })
        .collect();
    prompts.extend(
        [
            "",
            "a photograph of an astronaut riding a horse",
            "naïve café, 3 🍕 pizzas",
            "   spaces   and\ttabs  ",
            "unknownwordxyz qqq",
        ]
        .map(String::from),
    );
    let script = "import json, sys\nfrom transformers import CLIPTokenizer\n\
        t = CLIPTokenizer.from_pretrained(sys.argv[1])\n\
        ps = json.load(sys.stdin)\n\
        print(json.dumps([t(p, padding='max_length', max_length=77, truncation=True).input_ids for p in ps]))";
    let mut child = std::process::Command::new(common::python())
        .args(["-c", script])
        .arg(dir.join("tokenizer"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&prompts).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let want: Vec<Vec<i64>> = serde_json::from_slice(&out.stdout).unwrap();
    let mut failures = Vec::new();
    for (p, w) in prompts.iter().zip(&want) {
        let got = tok.encode(p).unwrap();
        if &got != w {
            failures.push(format!("{p:?}\n  got  {got:?}\n  want {w:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} prompts differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
