//! Where the client stands with each of its servers, said as one systemd
//! `STATUS=` line and in `/health`.
//!
//! With one server the line reads as it always did ("connected to a:9000 as
//! office", "disconnected from a:9000: …; reconnecting in 1.0 s"). With
//! several it counts first ("connected to 1 of 2 servers: a:9000;
//! disconnected from b:9000: …"), so `systemctl status` shows at a glance
//! whether the client still has every path, and a line never begins with
//! "connected" while no server is.

use std::sync::Mutex;

use crate::core::sync::lock;
use crate::systemd;

/// One server's state, as the status line tells it.
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// No attempt has finished yet.
    Connecting,
    Connected,
    /// The words of the last failure or disconnect, with when it retries.
    Down(String),
}

/// Every configured server's state, in configuration order.
pub(super) struct StatusBoard {
    client: String,
    servers: Mutex<Vec<(String, State)>>,
}

impl StatusBoard {
    pub(super) fn new(client: &str, servers: &[String]) -> StatusBoard {
        StatusBoard { client: client.to_string(), servers: Mutex::new(servers.iter().map(|s| (s.clone(), State::Connecting)).collect()) }
    }

    /// The session with server `index` authenticated.
    pub(super) fn connected(&self, index: usize) {
        self.set(index, State::Connected);
    }

    /// The session with server `index` ended or could not start: `problem`
    /// says why and when it retries.
    pub(super) fn down(&self, index: usize, problem: String) {
        self.set(index, State::Down(problem));
    }

    fn set(&self, index: usize, state: State) {
        let line = {
            let mut servers = lock(&self.servers);
            if let Some(slot) = servers.get_mut(index) {
                slot.1 = state;
            }
            status_line(&self.client, &servers)
        };
        systemd::status(&line);
    }

    /// The status line now.
    pub(super) fn line(&self) -> String {
        status_line(&self.client, &lock(&self.servers))
    }

    /// Each server and whether a session with it is authenticated now.
    pub(super) fn connections(&self) -> Vec<(String, bool)> {
        lock(&self.servers).iter().map(|(server, state)| (server.clone(), *state == State::Connected)).collect()
    }
}

fn status_line(client: &str, servers: &[(String, State)]) -> String {
    let problem = |server: &str, state: &State| match state {
        State::Connecting => format!("connecting to {server}"),
        State::Connected => format!("connected to {server} as {client}"),
        State::Down(problem) => problem.clone(),
    };
    if let [(server, state)] = servers {
        return problem(server, state);
    }
    let total = servers.len();
    let up: Vec<&str> = servers.iter().filter(|(_, s)| *s == State::Connected).map(|(server, _)| server.as_str()).collect();
    let others: Vec<String> = servers.iter().filter(|(_, s)| *s != State::Connected).map(|(server, s)| problem(server, s)).collect();
    let head = match up.len() {
        0 if servers.iter().all(|(_, s)| *s == State::Connecting) => {
            return format!("connecting to {total} servers: {}", servers.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", "))
        }
        0 => format!("not connected to any of {total} servers"),
        n => format!("connected to {n} of {total} servers as {client}: {}", up.join(", ")),
    };
    match others.is_empty() {
        true => head,
        false => format!("{head}; {}", others.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_reads_as_before_and_several_count_first() {
        let one = [("a:9000".to_string(), State::Connected)];
        assert_eq!(status_line("office", &one), "connected to a:9000 as office");
        let down = [("a:9000".to_string(), State::Down("disconnected from a:9000: refused; reconnecting in 1.0 s".into()))];
        assert_eq!(status_line("office", &down), "disconnected from a:9000: refused; reconnecting in 1.0 s");

        let a = |state| ("a:9000".to_string(), state);
        let b = |state| ("b:9000".to_string(), state);
        assert_eq!(status_line("office", &[a(State::Connecting), b(State::Connecting)]), "connecting to 2 servers: a:9000, b:9000");
        assert_eq!(
            status_line("office", &[a(State::Connected), b(State::Connected)]),
            "connected to 2 of 2 servers as office: a:9000, b:9000"
        );
        let b_down = || b(State::Down("disconnected from b:9000: refused; reconnecting in 2.0 s".into()));
        assert_eq!(
            status_line("office", &[a(State::Connected), b_down()]),
            "connected to 1 of 2 servers as office: a:9000; disconnected from b:9000: refused; reconnecting in 2.0 s"
        );
        let none = status_line("office", &[a(State::Connecting), b_down()]);
        assert_eq!(
            none,
            "not connected to any of 2 servers; connecting to a:9000; disconnected from b:9000: refused; reconnecting in 2.0 s"
        );
    }
}
