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
