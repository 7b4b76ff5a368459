//! The command line: every subcommand, flag and its help text (a contract:
//! scripts and operators depend on it).

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};

use super::units::{parse_cidr, parse_quota, parse_rate};
use crate::config::{Override, Role};
use crate::core::protocol::Protocol;
use crate::net::proxy_header::ProxyVersion;
use crate::policy::{Cidr, Quota};

#[derive(Parser)]
#[command(name = "tunneld", version, about = "TCP port forwarding and reverse tunnels with live traffic metrics")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the server: mappings, tunnel listener, HTTP API.
    Server(ServerArgs),
    /// Run the client: dial the server and reach targets inside this network.
    Client(ClientArgs),
    /// Print the effective configuration (secrets masked) and exit non-zero if invalid.
    CheckConfig {
        /// The file to check (default: /etc/tunneld/server.toml or client.toml, by role, when it exists).
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
        /// Where the state dir (or `server.tls_cert`) is read (default: /etc/tunneld/server.toml when it exists).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The server's state directory, where it generated its certificate.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<String>,
    },
    /// Print the version.
    Version,
}

#[derive(Args)]
pub(crate) struct CtlArgs {
    /// The server's API: HOST:PORT or an http:// URL (default: `api.listen` from the config).
    #[arg(long, value_name = "HOST:PORT|URL", global = true, value_parser = parse_api)]
    pub(crate) api: Option<String>,
    /// Where `api.listen` and `api.token` are read (default: /etc/tunneld/server.toml when it exists).
    #[arg(long, value_name = "FILE", global = true)]
    pub(crate) config: Option<PathBuf>,
    /// The API token. Visible to every user in `ps`: prefer TUNNELD_API__TOKEN, `api.token` in the
    /// config file, or TUNNELD_API__TOKEN= in the env file beside it (server.env).
    #[arg(long, value_name = "TOKEN", global = true)]
    pub(crate) token: Option<String>,
    #[command(subcommand)]
    pub(crate) command: CtlCommand,
}

#[derive(Subcommand)]
pub(crate) enum CtlCommand {
    /// List the mappings.
    List,
    /// Create a mapping from PORT on the server to TARGET (HOST:PORT).
    Create {
        port: u16,
        #[arg(value_name = "HOST:PORT")]
        target: String,
        /// `tcp` or `udp`: UDP 53 and TCP 53 are two mappings.
        #[arg(long, default_value = "tcp", value_parser = protocol)]
        protocol: Protocol,
        /// Reach the target through the tunnel client instead of directly.
        #[arg(long)]
        tunnel: bool,
        /// The tunnel client that reaches the target; given more than once, a
        /// group of clients that share its visitors (see --balance).
        #[arg(long, value_name = "NAME", requires = "tunnel")]
        client: Vec<String>,
        /// How a group's visitors are shared: failover (default, in the order
        /// given), round_robin or least_connections.
        #[arg(long, value_name = "MODE", requires = "tunnel")]
        balance: Option<String>,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Change a mapping's description, bandwidth limit, quota, allow/deny lists or PROXY
    /// protocol header; what is not given stays as it is, and open connections are kept.
    #[command(group(ArgGroup::new("change").required(true).multiple(true).args([
        "description", "bandwidth_limit", "quota", "allow", "deny", "proxy_protocol",
        "no_description", "no_bandwidth_limit", "no_quota", "no_allow", "no_deny", "no_proxy_protocol",
    ])))]
    Update {
        port: u16,
        /// The mapping's protocol.
        #[arg(long, default_value = "tcp", value_parser = protocol)]
        protocol: Protocol,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Remove the description.
        #[arg(long, conflicts_with = "description")]
        no_description: bool,
        /// Remove the bandwidth limit.
        #[arg(long, conflicts_with = "bandwidth_limit")]
        no_bandwidth_limit: bool,
        /// Remove the quota.
        #[arg(long, conflicts_with = "quota")]
        no_quota: bool,
        /// Empty the allow list (everyone not denied is let in).
        #[arg(long, conflicts_with = "allow")]
        no_allow: bool,
        /// Empty the deny list.
        #[arg(long, conflicts_with = "deny")]
        no_deny: bool,
        /// Stop sending targets a PROXY protocol header.
        #[arg(long, conflicts_with = "proxy_protocol")]
        no_proxy_protocol: bool,
    },
    /// Remove the mapping on PORT (of `--protocol`, TCP unless told).
    Remove {
        port: u16,
        /// The mapping's protocol.
        #[arg(long, default_value = "tcp", value_parser = protocol)]
        protocol: Protocol,
    },
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
    /// The open visitor connections (of PORT), oldest first, with their bytes and rates.
    Conns {
        port: Option<u16>,
        /// Only those served by this tunnel client.
        #[arg(long, value_name = "NAME")]
        client: Option<String>,
        /// How many to show.
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
    /// Reset the open connection ID (see `conns`): its visitor gets a reset.
    Close { id: u64 },
    /// Ended connections from the connection log, newest first, with how each ended.
    Log {
        /// Only this mapping's.
        #[arg(long)]
        port: Option<u16>,
        /// Only those served by this tunnel client.
        #[arg(long, value_name = "NAME")]
        client: Option<String>,
        /// Only those from this IP address (or exact IP:PORT).
        #[arg(long, value_name = "ADDRESS")]
        source: Option<String>,
        /// How many to show.
        #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
    /// The source addresses that moved the most bytes (of PORT), from the connection log.
    Sources {
        port: Option<u16>,
        /// Over the last N days.
        #[arg(long, value_name = "N", default_value_t = 31, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// How many to show.
        #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// A live view of per-port rates, by port; q quits.
    Top {
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
}

/// A mapping's policy as `create` and `update` take it.
#[derive(Args)]
pub(crate) struct PolicyArgs {
    /// A label, shown in `list`, on the monitor page and in events.
    #[arg(long, value_name = "TEXT")]
    pub(crate) description: Option<String>,
    /// Cap per direction, shared by the mapping's connections: bytes/s, or 10MB/s, 1.5MiB/s, 8Mbit/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub(crate) bandwidth_limit: Option<u64>,
    /// Traffic allowance, both directions together: SIZE/day|month:alert|block, e.g. 300GB/month:block.
    #[arg(long, value_name = "SIZE/PERIOD:ACTION", value_parser = parse_quota)]
    pub(crate) quota: Option<Quota>,
    /// Visitor addresses let in: CIDR blocks or addresses, comma-separated (replaces the list).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_cidr)]
    pub(crate) allow: Option<Vec<Cidr>>,
    /// Visitor addresses refused (wins over --allow): CIDR blocks or addresses, comma-separated.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', value_parser = parse_cidr)]
    pub(crate) deny: Option<Vec<Cidr>>,
    /// Send each target a PROXY protocol header (v1 text, v2 binary) with the visitor's address.
    #[arg(long, value_name = "v1|v2", value_parser = parse_proxy_version)]
    pub(crate) proxy_protocol: Option<ProxyVersion>,
}

/// `--proxy-protocol`: `v1` or `v2`.
fn parse_proxy_version(text: &str) -> Result<ProxyVersion, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "v1" | "1" => Ok(ProxyVersion::V1),
        "v2" | "2" => Ok(ProxyVersion::V2),
        _ => Err(format!("{text:?} is not a PROXY protocol version: v1 or v2")),
    }
}

/// `--api`: an `http://` or `https://` URL, or `HOST:PORT` as every other
/// address flag takes it (then `http://`; a wildcard host is reached on loopback).
fn parse_api(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.starts_with("http://") || text.starts_with("https://") {
        return Ok(text.trim_end_matches('/').to_string());
    }
    let forms = "HOST:PORT (127.0.0.1:8080) or an http:// URL";
    if text.contains("://") {
        return Err(format!("{text:?} is not {forms}"));
    }
    match crate::config::split_host_port(text) {
        Some((host, port)) => match host.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(format!("http://{}", crate::config::reachable_here((ip, port).into()))),
            Err(_) => Ok(format!("http://{host}:{port}")),
        },
        None => Err(format!("{text:?} is not {forms}")),
    }
}

#[derive(Subcommand)]
pub(crate) enum ClientCommand {
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

#[derive(Args)]
pub(crate) struct ServerArgs {
    /// The configuration file (default: /etc/tunneld/server.toml when it exists).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    #[arg(long, value_name = "ADDR")]
    pub(crate) api_listen: Option<String>,
    #[arg(long, value_name = "ADDR")]
    pub(crate) tunnel_listen: Option<String>,
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<String>,
    /// Visible to every user in `ps`: prefer --secret-file or TUNNELD_SERVER__SECRET.
    #[arg(long)]
    pub(crate) secret: Option<String>,
    /// A file whose first line is the shared secret.
    #[arg(long, value_name = "FILE", conflicts_with = "secret")]
    pub(crate) secret_file: Option<String>,
    #[arg(long, value_name = "TOKEN")]
    pub(crate) api_token: Option<String>,
}

#[derive(Args)]
pub(crate) struct ClientArgs {
    /// The configuration file (default: /etc/tunneld/client.toml when it exists).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// host:port of the server's tunnel listener.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) server: Option<String>,
    /// This client's name on the server (default: `default`).
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// Visible to every user in `ps`: prefer --secret-file or TUNNELD_CLIENT__SECRET.
    #[arg(long)]
    pub(crate) secret: Option<String>,
    /// A file whose first line is this client's secret.
    #[arg(long, value_name = "FILE", conflicts_with = "secret")]
    pub(crate) secret_file: Option<String>,
    /// The server certificate's fingerprint to pin (`tunneld fingerprint` on the server).
    #[arg(long, value_name = "sha256:HEX")]
    pub(crate) fingerprint: Option<String>,
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_listen: Option<String>,
}

impl ServerArgs {
    pub(crate) fn overrides(&self) -> Vec<Override> {
        collect(&[
            ("api.listen", &self.api_listen),
            ("server.tunnel_listen", &self.tunnel_listen),
            ("server.state_dir", &self.state_dir),
            ("server.secret", &self.secret),
            ("server.secret_file", &self.secret_file),
            ("api.token", &self.api_token),
        ])
    }
}

impl ClientArgs {
    pub(crate) fn overrides(&self) -> Vec<Override> {
        collect(&[
            ("client.server", &self.server),
            ("client.name", &self.name),
            ("client.secret", &self.secret),
            ("client.secret_file", &self.secret_file),
            ("client.server_fingerprint", &self.fingerprint),
            ("client.metrics_listen", &self.metrics_listen),
        ])
    }
}

pub(crate) fn collect(flags: &[(&'static str, &Option<String>)]) -> Vec<Override> {
    flags.iter().filter_map(|(key, value)| value.as_ref().map(|v| Override { key, value: v.clone() })).collect()
}

/// `--protocol`: `tcp` or `udp`.
fn protocol(text: &str) -> Result<Protocol, String> {
    Protocol::parse(text).ok_or_else(|| format!("must be tcp or udp, not {text:?}"))
}
