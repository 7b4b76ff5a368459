//! `tunneld`: one binary, two roles. See `tunneld --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use tunneld::config::{self, Config, Override, Role};
use tunneld::{client, server, systemd};

#[derive(Parser)]
#[command(name = "tunneld", version, about = "TCP port forwarding and reverse tunnels with live traffic metrics")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: mappings, tunnel listener, HTTP API.
    Server(ServerArgs),
    /// Run the client: dial the server and reach targets inside this network.
    Client(ClientArgs),
    /// Print the effective configuration (secrets masked) and exit non-zero if invalid.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Which role's settings to check.
        #[arg(value_enum, default_value = "server")]
        role: Role,
    },
    /// Talk to a running server's API: mappings, traffic, a live view.
    Ctl(CtlArgs),
    /// Print the server's tunnel certificate fingerprint (sha256:...) for clients to pin.
    Fingerprint {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<String>,
    },
    /// Print the version.
    Version,
}

#[derive(Args)]
struct CtlArgs {
    /// The server's API, e.g. http://127.0.0.1:8080 (default: `api.listen` from the config).
    #[arg(long, value_name = "URL", global = true)]
    api: Option<String>,
    /// Where `api.listen` and `api.token` are read (default: /etc/tunneld/server.toml when it
    /// exists). The token may also come from TUNNELD_API__TOKEN.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// List the mappings.
    List,
    /// Create a mapping from PORT on the server to TARGET (HOST:PORT).
    Create {
        port: u16,
        #[arg(value_name = "HOST:PORT")]
        target: String,
        /// Reach the target through the tunnel client instead of directly.
        #[arg(long)]
        tunnel: bool,
        /// The tunnel client that reaches the target.
        #[arg(long, value_name = "NAME", requires = "tunnel")]
        client: Option<String>,
    },
    /// Remove the mapping on PORT.
    Remove { port: u16 },
    /// Manage the tunnel clients (each with a name and its own secret).
    #[command(subcommand)]
    Client(ClientCommand),
    /// Traffic per mapping since the daemon started, in human units.
    Stats,
    /// Recent events (quota thresholds, ports that cannot bind, clients lost and back), newest first.
    Events {
        /// How many to show.
        #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// A live view of per-port rates; q quits.
    Top {
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// List the clients: connected or not, from where, traffic, mappings.
    List,
    /// Create a client; prints its secret, which is shown only this once.
    Create { name: String },
    /// Remove a client: its session ends now and it cannot authenticate again.
    Remove {
        name: String,
        /// Remove it even while mappings name it (they wait for a client of that name).
        #[arg(long)]
        force: bool,
    },
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.2..=3600.0).contains(&v) => Ok(v),
        _ => Err("must be a number of seconds between 0.2 and 3600".into()),
    }
}

/// Runs one `ctl` subcommand; non-zero with the API's own message when it refuses.
fn ctl(args: CtlArgs) -> ExitCode {
    use std::time::Duration;
    use tunneld::ctl;
    let result = ctl::Api::from_settings(args.api.as_deref(), args.config.as_deref()).and_then(|api| match args.command {
        CtlCommand::List => ctl::list(&api).map(Some),
        CtlCommand::Create { port, target, tunnel, client } => ctl::create(&api, port, &target, tunnel, client.as_deref()).map(Some),
        CtlCommand::Remove { port } => ctl::remove(&api, port).map(Some),
        CtlCommand::Client(ClientCommand::List) => ctl::client_list(&api).map(Some),
        CtlCommand::Client(ClientCommand::Create { name }) => ctl::client_create(&api, &name).map(Some),
        CtlCommand::Client(ClientCommand::Remove { name, force }) => ctl::client_remove(&api, &name, force).map(Some),
        CtlCommand::Stats => ctl::stats(&api).map(Some),
        CtlCommand::Events { limit } => ctl::events(&api, limit).map(Some),
        CtlCommand::Top { interval } => ctl::top(&api, Duration::from_secs_f64(interval)).map(|()| None),
    });
    match result {
        Ok(output) => {
            print!("{}", output.unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tunneld ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Args)]
struct ServerArgs {
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long, value_name = "ADDR")]
    api_listen: Option<String>,
    #[arg(long, value_name = "ADDR")]
    tunnel_listen: Option<String>,
    #[arg(long, value_name = "DIR")]
    state_dir: Option<String>,
    #[arg(long)]
    secret: Option<String>,
    #[arg(long, value_name = "TOKEN")]
    api_token: Option<String>,
}

#[derive(Args)]
struct ClientArgs {
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// host:port of the server's tunnel listener.
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// This client's name on the server (default: `default`).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[arg(long)]
    secret: Option<String>,
    /// The server certificate's fingerprint to pin (`tunneld fingerprint` on the server).
    #[arg(long, value_name = "sha256:HEX")]
    fingerprint: Option<String>,
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

impl ServerArgs {
    fn overrides(&self) -> Vec<Override> {
        collect(&[
            ("api.listen", &self.api_listen),
            ("server.tunnel_listen", &self.tunnel_listen),
            ("server.state_dir", &self.state_dir),
            ("server.secret", &self.secret),
            ("api.token", &self.api_token),
        ])
    }
}

impl ClientArgs {
    fn overrides(&self) -> Vec<Override> {
        collect(&[
            ("client.server", &self.server),
            ("client.name", &self.name),
            ("client.secret", &self.secret),
            ("client.server_fingerprint", &self.fingerprint),
            ("client.metrics_listen", &self.metrics_listen),
        ])
    }
}

fn collect(flags: &[(&'static str, &Option<String>)]) -> Vec<Override> {
    flags.iter().filter_map(|(key, value)| value.as_ref().map(|v| Override { key, value: v.clone() })).collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (role, file, overrides) = match cli.command {
        Command::Version => {
            println!("tunneld {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Ctl(args) => return ctl(args),
        Command::CheckConfig { config, role } => {
            return match config::load(config.as_deref(), &[], role) {
                Ok(cfg) => {
                    print!("{}", cfg.to_masked_toml(role));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tunneld: invalid configuration: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Fingerprint { config, state_dir } => return print_fingerprint(config.as_deref(), &state_dir),
        Command::Server(args) => (Role::Server, args.config.clone(), args.overrides()),
        Command::Client(args) => (Role::Client, args.config.clone(), args.overrides()),
    };
    // Validate everything before binding anything.
    let config = match config::load(file.as_deref(), &overrides, role) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tunneld: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let log = systemd::init_logging(&config.log.level);
    if let Some((before, after)) = tunneld::forward::raise_descriptor_limit() {
        info!(before, after, "raised the open-file limit (RLIMIT_NOFILE) to the hard limit");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(role, config, file, overrides, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logged once: the log goes to stderr (or the journal, which also
            // captures stderr), so printing it as well would say it twice.
            error!(error = %format!("{e:#}"), "tunneld failed");
            ExitCode::FAILURE
        }
    }
}

/// `tunneld fingerprint`: the certificate the server presents (configured, or the
/// one it generated in its state dir). Does not generate one: the server does
/// that on its first start, as the user it runs as.
fn print_fingerprint(file: Option<&std::path::Path>, state_dir: &Option<String>) -> ExitCode {
    let overrides = collect(&[("server.state_dir", state_dir)]);
    let config = match config::load(file, &overrides, Role::Server) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tunneld: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if !config.server.tls {
        eprintln!("tunneld: server.tls = false: the tunnel has no certificate");
        return ExitCode::from(2);
    }
    let dir = config::state_dir(&config.server);
    let (cert, key) = tunneld::tls::cert_paths(&config.server, &dir);
    if !cert.exists() {
        eprintln!("tunneld: no certificate at {}: start the server once (it generates one there) or set server.tls_cert", cert.display());
        return ExitCode::FAILURE;
    }
    match tunneld::tls::load(&cert, &key) {
        Ok(identity) => {
            println!("{}", identity.fingerprint());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tunneld: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(role: Role, config: Config, file: Option<PathBuf>, overrides: Vec<Override>, log: systemd::LogHandle) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let (reload_tx, reloads) = mpsc::channel(4);
    spawn_signal_handlers(shutdown.clone(), reload_tx, role, file, overrides, log)?;
    systemd::spawn_watchdog();
    match role {
        Role::Server => {
            let listeners = server::Listeners::bind(&config).await?;
            server::run(config, listeners, shutdown, reloads).await
        }
        Role::Client => {
            let metrics_listener = client::bind_metrics(&config.client).await?;
            client::run(config, metrics_listener, shutdown, reloads).await
        }
    }
}

/// SIGTERM/SIGINT start a graceful stop; SIGHUP re-reads the configuration and,
/// if it is valid, hands it to the running role (an invalid one is logged and the
/// running configuration stays).
fn spawn_signal_handlers(
    shutdown: CancellationToken,
    reload_tx: mpsc::Sender<Config>,
    role: Role,
    file: Option<PathBuf>,
    overrides: Vec<Override>,
    log: systemd::LogHandle,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!(signal = "SIGTERM", "stopping"); break; }
                _ = int.recv() => { info!(signal = "SIGINT", "stopping"); break; }
                _ = hup.recv() => {
                    systemd::reloading();
                    match config::load_for_reload(file.as_deref(), &overrides, role) {
                        Ok(new) => {
                            systemd::set_log_level(&log, &new.log.level);
                            info!(level = %new.log.level, "configuration reloaded");
                            // The role answers READY=1 once it has applied it.
                            let _ = reload_tx.send(new).await;
                        }
                        Err(e) => {
                            warn!(error = %e, "reload rejected: the new configuration is invalid; keeping the running one");
                            systemd::ready(&format!("running; reload rejected: {e}"));
                        }
                    }
                }
            }
        }
        shutdown.cancel();
    });
    Ok(())
}
