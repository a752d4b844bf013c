//! Which models a stack serves: `--model` (or sdserve's default model),
//! single files and their `--config`, each checked for a family sdserve
//! serves before anything starts.

use super::*;

/// Whether `model` is a single-file checkpoint rather than a model directory.
pub(super) fn is_single_file(model: &Path) -> bool {
    !model.is_dir()
}

/// The `--config` of `model`: none for a model directory (it has its own
/// configs); for a single file, the one `--config`, or the one given in
/// its place among the single-file models.
pub(super) fn config_for<'a>(args: &'a UpArgs, model: &Path) -> Option<&'a PathBuf> {
    if !is_single_file(model) {
        return None;
    }
    match args.config.as_slice() {
        [] => None,
        [one] => Some(one),
        each => {
            let at = args
                .model
                .iter()
                .filter(|m| is_single_file(m))
                .position(|m| m == model)?;
            each.get(at)
        }
    }
}

/// A model directory (or `--config` directory) whose pipeline class
/// sdserve does not serve is refused here, before any service starts:
/// every service would refuse it too, each after its start-up.
pub(super) fn check_family(dir: &Path) -> anyhow::Result<()> {
    let index = dir.join("model_index.json");
    if is_single_file(dir) || !index.is_file() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(&index).map_err(|e| anyhow::anyhow!("{}: {e}", index.display()))?;
    sd_proto::Family::of_model_index(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    Ok(())
}

/// `--config` given once, or once per single-file `--model`, and only
/// with one.
pub(super) fn check_configs(args: &UpArgs) -> anyhow::Result<()> {
    let singles = args.model.iter().filter(|m| is_single_file(m)).count();
    match args.config.len() {
        0 => Ok(()),
        _ if singles == 0 => anyhow::bail!(
            "--config describes a single-file checkpoint, and no --model is one (a model \
             directory has its own configs)"
        ),
        1 => Ok(()),
        n if n == singles => Ok(()),
        n => anyhow::bail!(
            "--config given {n} times for {singles} single-file --model(s): give it once for \
             all of them, or once for each, in order"
        ),
    }
}

/// Where sdserve's default model is looked for, in order: beside a
/// checkout's `target/{debug,release}/` binaries, an installed
/// `share/sdserve/`, the working directory.
pub(super) fn default_model_candidates(bin: &Path) -> Vec<PathBuf> {
    vec![
        bin.join("../../models/emoji"),
        bin.join("../share/sdserve/models/emoji"),
        PathBuf::from("models/emoji"),
    ]
}

/// The model to serve: `--model`, or the default model.
pub(super) fn model_dir(args: &UpArgs) -> anyhow::Result<PathBuf> {
    if let Some(m) = args.model.first() {
        return Ok(m.clone());
    }
    let bin = bin_dir(args)?;
    let candidates = default_model_candidates(&bin);
    let found = candidates
        .iter()
        .find(|c| c.join("model_index.json").is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no --model given and sdserve's default model is not at {}: pass --model DIR \
                 (a diffusers-layout Stable Diffusion model)",
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let found = found.canonicalize().unwrap_or_else(|_| found.clone());
    eprintln!(
        "sdctl: no --model given: serving sdserve's default model {} (32×32 emoji, trained \
         by the project; --model DIR for a real Stable Diffusion model)",
        found.display()
    );
    Ok(found)
}

/// A model's name, as the gateway serves it: a folder's name, a single
/// file's stem.
pub(super) fn model_name(model: &Path) -> String {
    let name = if model.is_file() {
        model.file_stem()
    } else {
        model.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}
