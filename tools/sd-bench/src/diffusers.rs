//! diffusers, the reference, in a Python process of its own.

use super::*;

/// diffusers in a Python process of its own, generating an image when asked
/// (`diffusers_bench.py`).
pub(crate) struct Diffusers {
    pub(crate) child: Child,
    pub(crate) stdin: std::process::ChildStdin,
    pub(crate) lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Diffusers {
    pub(crate) fn start(args: &Args) -> anyhow::Result<Self> {
        Self::start_in(args, args.precision)
    }

    /// diffusers in `precision`, whatever `args` says.
    pub(crate) fn start_in(args: &Args, precision: Precision) -> anyhow::Result<Self> {
        let python = args
            .python
            .clone()
            .unwrap_or_else(|| PathBuf::from(".venv/bin/python"));
        let script = diffusers_script()?;
        let mut child = Command::new(python)
            .arg(script)
            .args([
                args.model.to_string_lossy().as_ref(),
                &args.steps.to_string(),
                &args.size.to_string(),
                &args.threads.to_string(),
                &args.device.to_string(),
                &precision.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting the diffusers benchmark: {e}"))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut me = Diffusers {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        me.expect(|l| (l == "ready").then_some(()))?;
        Ok(me)
    }

    pub(crate) fn expect<T>(&mut self, parse: impl Fn(&str) -> Option<T>) -> anyhow::Result<T> {
        for line in self.lines.by_ref() {
            if let Some(v) = parse(line?.trim()) {
                return Ok(v);
            }
        }
        anyhow::bail!("the diffusers benchmark stopped")
    }

    /// Seconds for the image and the mean seconds of one denoising step.
    pub(crate) fn image(&mut self, seed: u64, prompt: &str) -> anyhow::Result<(f64, f64)> {
        self.image_to(seed, prompt, None)
    }

    /// As [`Diffusers::image`], saving the image to `png` when given.
    pub(crate) fn image_to(
        &mut self,
        seed: u64,
        prompt: &str,
        png: Option<&Path>,
    ) -> anyhow::Result<(f64, f64)> {
        use std::io::Write;
        match png {
            Some(p) => writeln!(self.stdin, "{seed}\t{prompt}\t{}", p.display())?,
            None => writeln!(self.stdin, "{seed}\t{prompt}")?,
        }
        self.stdin.flush()?;
        self.expect(|l| {
            let mut f = l.strip_prefix("seconds_per_image ")?.split(" mean_step ");
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
    }
}

/// `diffusers_bench.py`: beside this binary where it was shipped so (the
/// GPU bundle), else in this crate's source.
fn diffusers_script() -> anyhow::Result<PathBuf> {
    const NAME: &str = "diffusers_bench.py";
    let beside = sd_launch::bin_dir()?.join(NAME);
    if beside.is_file() {
        return Ok(beside);
    }
    Ok(Path::new(env!("CARGO_MANIFEST_DIR")).join(NAME))
}

impl Drop for Diffusers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
