//! Logging to journald in its native protocol, so that what `journalctl` shows
//! by default is what a person needs: the MESSAGE carries the event's fields as
//! text (`start a client with client_command=tunneld client --server …`), as
//! the stderr format does, and every field is also sent as a journal field of
//! its own (`F_PORT=22`, `F_CLIENT_COMMAND=…`, queryable with `journalctl
//! F_PORT=22`). `tracing-journald` sends only the bare message text, which
//! hides the fingerprint, the client command line, ports and reasons from
//! everyone who does not know `-o verbose`.
//!
//! The native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): one datagram per
//! entry to journald's socket, a field per line as `NAME=value`, or, for a value
//! holding a newline, `NAME\n` + its length as 64-bit little endian + the value
//! + `\n`.

use std::fmt::{self, Write as _};
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// Where journald reads native-protocol datagrams.
const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// For tests only: another socket to send the entries to, so a test can read
/// them without a real journald. Nothing in a deployment sets it.
pub(crate) const SOCKET_OVERRIDE_ENV: &str = "TUNNELD_JOURNAL_SOCKET";

/// Prefix of the event's own fields, as `tracing-journald` names them, so a
/// user field can never collide with journald's (`MESSAGE`, `PRIORITY`, …)
/// and queries written for the earlier layer keep working.
const FIELD_PREFIX: &str = "F_";

/// A field value longer than this is cut (with a marker): an entry must fit in
/// one datagram.
const MAX_VALUE: usize = 16 * 1024;

/// The journald layer.
pub(crate) struct JournalLayer {
    socket: UnixDatagram,
    path: PathBuf,
    identifier: String,
}

impl JournalLayer {
    /// Connects to journald (or the test override); fails when nothing listens
    /// there, so the caller can log to stderr instead.
    pub(crate) fn new() -> io::Result<JournalLayer> {
        let path = std::env::var_os(SOCKET_OVERRIDE_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(JOURNALD_SOCKET));
        let socket = UnixDatagram::unbound()?;
        // journald discards an empty datagram; sending one proves it listens.
        socket.send_to(&[], &path)?;
        let identifier = std::env::args_os()
            .next()
            .as_deref()
            .and_then(|p| std::path::Path::new(p).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tunneld".to_string());
        Ok(JournalLayer { socket, path, identifier })
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let mut entry = Vec::with_capacity(512);
        put(&mut entry, "MESSAGE", &fields.text());
        put(&mut entry, "PRIORITY", priority(*meta.level()));
        put(&mut entry, "SYSLOG_IDENTIFIER", &self.identifier);
        put(&mut entry, "TARGET", meta.target());
        if let Some(file) = meta.file() {
            put(&mut entry, "CODE_FILE", file);
        }
        if let Some(line) = meta.line() {
            put(&mut entry, "CODE_LINE", &line.to_string());
        }
        for (name, value) in &fields.others {
            put(&mut entry, &journal_name(name), value);
        }
        // Nowhere to report a lost log line but the log itself.
        let _ = self.socket.send_to(&entry, &self.path);
    }
}

/// journald's priorities: error 3, warning 4, notice 5 (info), info 6 (debug),
/// debug 7 (trace), as `tracing-journald` maps them.
fn priority(level: Level) -> &'static str {
    match level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "5",
        Level::DEBUG => "6",
        Level::TRACE => "7",
    }
}

/// `F_` + the field's name upper-cased, with anything but A-Z, 0-9 and `_`
/// made `_` (journald drops fields named otherwise).
fn journal_name(field: &str) -> String {
    let mut name = String::with_capacity(FIELD_PREFIX.len() + field.len());
    name.push_str(FIELD_PREFIX);
    name.extend(field.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }));
    name
}

/// Appends one field in the native protocol's encoding.
fn put(entry: &mut Vec<u8>, name: &str, value: &str) {
    let value = cut(value);
    entry.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        entry.push(b'\n');
        entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        entry.push(b'=');
    }
    entry.extend_from_slice(value.as_bytes());
    entry.push(b'\n');
}

fn cut(value: &str) -> std::borrow::Cow<'_, str> {
    if value.len() <= MAX_VALUE {
        return value.into();
    }
    let mut end = MAX_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut)", &value[..end]).into()
}

/// An event's message and its other fields, each as the stderr format shows it.
#[derive(Default)]
struct Fields {
    message: String,
    others: Vec<(&'static str, String)>,
}

impl Fields {
    /// The message, then ` name=value` for each field: the text a person reads.
    fn text(&self) -> String {
        let mut text = self.message.clone();
        for (name, value) in &self.others {
            let _ = write!(text, "{}{name}={}", if text.is_empty() { "" } else { " " }, shown(value));
        }
        text
    }
}

/// A value as the stderr format shows it: quoted when it holds a space, a
/// quote or nothing, so where it ends is never in doubt.
fn shown(value: &str) -> std::borrow::Cow<'_, str> {
    if value.is_empty() || value.contains([' ', '"', '\n', '\t']) {
        format!("{value:?}").into()
    } else {
        value.into()
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` arrives here as a Debug that prints x's Display.
        self.record(field, format!("{value:?}"));
    }
}

impl Fields {
    fn record(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = value,
            name => self.others.push((name, value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(mut entry: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while !entry.is_empty() {
            let nl = entry.iter().position(|&b| b == b'\n').unwrap();
            let line = &entry[..nl];
            if let Some(eq) = line.iter().position(|&b| b == b'=') {
                out.push((String::from_utf8_lossy(&line[..eq]).into(), String::from_utf8_lossy(&line[eq + 1..]).into()));
                entry = &entry[nl + 1..];
            } else {
                let len = u64::from_le_bytes(entry[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = &entry[nl + 9..nl + 9 + len];
                out.push((String::from_utf8_lossy(line).into(), String::from_utf8_lossy(value).into()));
                entry = &entry[nl + 9 + len + 1..];
            }
        }
        out
    }

    #[test]
    fn fields_are_encoded_in_the_native_protocol_with_multiline_values_length_prefixed() {
        let mut entry = Vec::new();
        put(&mut entry, "MESSAGE", "one line");
        put(&mut entry, "F_ERROR", "two\nlines");
        assert_eq!(decode(&entry), [("MESSAGE".into(), "one line".into()), ("F_ERROR".into(), "two\nlines".into())]);
    }

    #[test]
    fn names_are_made_what_journald_accepts() {
        assert_eq!(journal_name("client_command"), "F_CLIENT_COMMAND");
        assert_eq!(journal_name("peer.addr"), "F_PEER_ADDR");
    }

    #[test]
    fn the_message_text_carries_every_field_quoted_where_it_has_spaces() {
        let fields = Fields {
            message: "start a client with".into(),
            others: vec![("client_command", "tunneld client --server h:9000".into()), ("port", "22".into())],
        };
        assert_eq!(fields.text(), r#"start a client with client_command="tunneld client --server h:9000" port=22"#);
    }
}
