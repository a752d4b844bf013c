//! The internal token of a stack: random, made once, given to every child
//! in its environment (never its command line, which `ps` shows).

pub struct StackToken(String);

impl std::fmt::Debug for StackToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StackToken(..)")
    }
}

impl StackToken {
    pub fn give_to(&self, command: &mut std::process::Command) {
        command
            .env(sd_proto::INTERNAL_TOKEN_ENV, &self.0)
            .env_remove(sd_proto::INTERNAL_TOKEN_FILE_ENV);
    }
}

pub fn stack_token() -> anyhow::Result<&'static StackToken> {
    static TOKEN: std::sync::OnceLock<StackToken> = std::sync::OnceLock::new();
    if let Some(t) = TOKEN.get() {
        return Ok(t);
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no random internal token: {e}"))?;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(TOKEN.get_or_init(|| StackToken(hex)))
}
