//! sdctl: `up` starts the four sdserve processes on localhost and keeps
//! them up; `generate`
//! asks a gateway for images, with a progress bar.

mod alloc;
mod child;
mod generate;
mod stage;
mod supervise;
mod token;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "sdserve: Stable Diffusion as gRPC microservices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start text-encoder, denoiser, autoencoder and gateway on localhost.
    Up(up::UpArgs),
    /// Generate images through a gateway.
    Generate(generate::GenerateArgs),
    /// Exit 0 if a server reports SERVING on grpc.health.v1 (container probes).
    Probe {
        /// Server address (host:port or URL).
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// Service to ask about ("" = the server as a whole).
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 2)]
        timeout: u64,
    },
    /// List the models a gateway serves.
    Models {
        #[command(flatten)]
        conn: generate::Connection,
    },
    /// List the LoRA adapters a gateway's model can apply (`--lora NAME`).
    Loras {
        #[command(flatten)]
        conn: generate::Connection,
        /// The model (name or id) whose adapters to list; default: the
        /// gateway's default model.
        #[arg(long, default_value = "")]
        model: String,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(a) => up::run(a).await,
        Command::Generate(a) => generate::run(a).await,
        Command::Models { conn } => generate::models(&conn).await,
        Command::Loras { conn, model } => generate::loras(&conn, &model).await,
        Command::Probe {
            addr,
            service,
            timeout,
        } => up::probe(&addr, &service, timeout).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
