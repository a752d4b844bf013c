//! Checks the Qwen3-encoder families (FLUX.2 Klein, Z-Image) share, run
//! against a stack on one tiny fixture.

use super::stack::Stack;

/// The official `openai` client and `webuiapi` get the pipeline's images
/// (`qwen_family_clients.py` on the fixture's `e2e/` cases).
pub fn clients(model: &str, family: &str) {
    let dir = super::model(model);
    let stack = Stack::start(&dir);
    super::run_client(
        "qwen_family_clients.py",
        &[
            stack.http.as_ref(),
            model.as_ref(),
            dir.join("e2e").as_os_str(),
            family.as_ref(),
        ],
    );
}

/// The fixture's PEFT LoRAs (`loras/`) give its `e2e-lora/` images, one at
/// a time and batched.
pub fn loras(model: &str) {
    let dir = super::model(model);
    let loras = dir.join("loras");
    let stack = Stack::start_with(&dir, &["--lora-dir", loras.to_str().unwrap()]);
    let e2e = dir.join("e2e-lora");
    super::e2e::check_all(
        &stack.url,
        &super::e2e::load_cases(&e2e),
        &e2e,
        &format!("{model}-lora"),
    );
}

/// The web page fits the family in headless Chromium (its default
/// `guidance`) and generates.
pub fn web_page(model: &str, family: &str, guidance: &str) {
    let stack = Stack::start(&super::model(model));
    super::run_client(
        "web_page_qwen_family.py",
        &[
            stack.http.as_ref(),
            model.as_ref(),
            family.as_ref(),
            guidance.as_ref(),
        ],
    );
}
