//! The process: the command line, the daemon roles wired to the API under
//! signals and systemd, and `tunneld ctl`, the operator's client of the API.
//!
//! The top floor: may import everything below it.

mod args;
mod conns;
mod ctl;
mod daemon;
mod declared;
mod top;
mod units;
mod untrusted;

use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info, warn};

use crate::config::{self, Role};
use crate::core::protocol::MappingKey;
use crate::systemd;
use args::{Cli, ClientCommand, Command, CtlArgs, CtlCommand};

/// `tunneld`'s `main`: parses the command line and runs what it asks for.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let secret_on_command_line = match &cli.command {
        Command::Server(args) => args.secret.is_some(),
        Command::Client(args) => args.secret.is_some(),
        _ => false,
    };
    let (role, file, overrides) = match cli.command {
        Command::Version => {
            println!("tunneld {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Ctl(args) => return ctl(args),
        Command::CheckConfig { config, role } => {
            let loaded = config::load(config.as_deref(), &[], role).and_then(|cfg| match role {
                Role::Server => declared::read(&cfg, declared::server_file(config.as_deref())).map(|_| cfg),
                Role::Client => Ok(cfg),
            });
            return match loaded {
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
    let loaded = config::load(file.as_deref(), &overrides, role).and_then(|cfg| match role {
        Role::Server => declared::read(&cfg, declared::server_file(file.as_deref())).map(|_| cfg),
        Role::Client => Ok(cfg),
    });
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tunneld: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let log = systemd::init_logging(&config.log.level);
    if secret_on_command_line {
        warn!("the secret was given with --secret: every user of this host can read it in `ps` and /proc; use --secret-file FILE or the TUNNELD_SERVER__SECRET / TUNNELD_CLIENT__SECRET environment variable");
    }
    if let Some((before, after)) = crate::net::socket::raise_descriptor_limit() {
        info!(before, after, "raised the open-file limit (RLIMIT_NOFILE) to the hard limit");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(role, config, file, overrides, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logged once: the log goes to stderr (or the journal, which also
            // captures stderr), so printing it as well would say it twice.
            error!(error = %format!("{e:#}"), "tunneld failed");
            // A declaration the running server refuses (a loop, say) is a bad
            // configuration like any other: the same exit status.
            if e.chain().any(|cause| cause.is::<crate::server::DeclarationRefused>()) {
                return ExitCode::from(2);
            }
            ExitCode::FAILURE
        }
    }
}

/// `tunneld fingerprint`: the certificate the server presents (configured, or the
/// one it generated in its state dir). Does not generate one: the server does
/// that on its first start, as the user it runs as.
fn print_fingerprint(file: Option<&std::path::Path>, state_dir: &Option<String>) -> ExitCode {
    let overrides = args::collect(&[("server.state_dir", state_dir)]);
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
    let (cert, key) = crate::net::tls::cert_paths(&config.server, &dir);
    if !cert.exists() {
        eprintln!("tunneld: no certificate at {}: start the server once (it generates one there) or set server.tls_cert", cert.display());
        return ExitCode::FAILURE;
    }
    match crate::net::tls::load(&cert, &key) {
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

/// Runs one `ctl` subcommand; non-zero with the API's own message when it refuses.
fn ctl(args: CtlArgs) -> ExitCode {
    use std::time::Duration;
    let result =
        ctl::Api::from_settings(args.api.as_deref(), args.config.as_deref(), args.token.as_deref()).and_then(|api| match args.command {
            CtlCommand::List => ctl::list(&api).map(Some),
            CtlCommand::Create { port, target, protocol, tunnel, client, balance, policy } => {
                ctl::create(&api, MappingKey { port, protocol }, &target, tunnel, &client, balance.as_deref(), policy).map(Some)
            }
            CtlCommand::Update {
                port,
                protocol,
                policy,
                no_description,
                no_bandwidth_limit,
                no_quota,
                no_allow,
                no_deny,
                no_proxy_protocol,
            } => {
                let remove = ctl::Removals {
                    description: no_description,
                    bandwidth_limit: no_bandwidth_limit,
                    quota: no_quota,
                    allow: no_allow,
                    deny: no_deny,
                    proxy_protocol: no_proxy_protocol,
                };
                ctl::update(&api, MappingKey { port, protocol }, policy, remove).map(Some)
            }
            CtlCommand::Remove { port, protocol } => ctl::remove(&api, MappingKey { port, protocol }).map(Some),
            CtlCommand::Client(ClientCommand::List) => ctl::client_list(&api).map(Some),
            CtlCommand::Client(ClientCommand::Create { name }) => ctl::client_create(&api, &name).map(Some),
            CtlCommand::Client(ClientCommand::Remove { name, force }) => ctl::client_remove(&api, &name, force).map(Some),
            CtlCommand::Stats => ctl::stats(&api).map(Some),
            CtlCommand::Events { limit } => ctl::events(&api, limit).map(Some),
            CtlCommand::Conns { port, client, limit } => conns::conns(&api, port, client.as_deref(), limit).map(Some),
            CtlCommand::Close { id } => conns::close(&api, id).map(Some),
            CtlCommand::Log { port, client, source, limit } => conns::log(&api, conns::LogFilter { port, client, source, limit }).map(Some),
            CtlCommand::Sources { port, days, limit } => conns::sources(&api, port, days, limit).map(Some),
            CtlCommand::Top { interval } => top::top(&api, Duration::from_secs_f64(interval)).map(|()| None),
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
