//! SQLite persistence: mappings, tunnel clients, traffic history buckets, the
//! event log and the connection log, in one private database file in the state directory.
//!
//! Every write is one transaction with `synchronous=FULL`, so a mapping the API
//! reported as created is on disk, and a crash never leaves half a row. Calls are
//! short and rare (API writes, start-up restore, one history flush per
//! interval); they run on the blocking pool.
//!
//! May import `core` and `policy`.

mod clients;
pub(crate) mod connection_log;
mod db;
pub(crate) mod events;
pub(crate) mod history;
mod mappings;
mod schema;

pub(crate) use clients::StoredClient;
pub use db::{Store, StoreError};
pub use mappings::{MappingSpec, Source};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::secret::Secret;
    use crate::policy::Policy;
    use rusqlite::Connection;

    #[tokio::test]
    async fn mappings_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = MappingSpec {
            source_port: 4000,
            protocol: crate::core::protocol::Protocol::Tcp,
            target_host: "127.0.0.1".into(),
            target_port: 22,
            use_tunnel: true,
            client: Some("office".into()),
            clients: vec!["office".into()],
            balance: Default::default(),
            health_check: None,
            created_at: 1,
            source: Source::Config,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert(m.clone(), &Policy::default()).await.unwrap();
            assert!(store.insert(m.clone(), &Policy::default()).await.is_err(), "duplicate port must be refused");
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list().await.unwrap(), vec![(m, Policy::default())]);
        let policy =
            Policy { bandwidth_limit: Some(5), allow: vec![crate::policy::Cidr::parse("10.0.0.0/8").unwrap()], ..Policy::default() };
        assert!(store.set_policy(crate::core::protocol::MappingKey::tcp(4000), &policy).await.unwrap());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list().await.unwrap()[0].1, policy);
        assert!(store.remove(crate::core::protocol::MappingKey::tcp(4000)).await.unwrap());
        assert!(!store.remove(crate::core::protocol::MappingKey::tcp(4000)).await.unwrap());
        assert!(store.list().await.unwrap().is_empty());
        assert!(!dir.path().join("tunneld.db-shm").exists(), "no shared-memory file to fault on");
    }

    #[tokio::test]
    async fn proxy_protocol_is_kept_and_policies_stored_before_it_read_as_none() {
        use crate::net::proxy_header::ProxyVersion;
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            drop(store);
            // A row as the release before `proxy_protocol` wrote it: the policy
            // column's JSON has no such key, and no schema change is needed.
            let conn = Connection::open(dir.path().join("tunneld.db")).unwrap();
            conn.execute_batch(
                r#"INSERT INTO mappings (source_port, target_host, target_port, use_tunnel, created_at, policy, client)
                   VALUES (4000, 'example.com', 22, 0, 7,
                           '{"description":"old","bandwidth_limit":null,"quota":null,"allow":[],"deny":[]}', NULL);"#,
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let policy = store.list().await.unwrap()[0].1.clone();
        assert_eq!((policy.description.as_deref(), policy.proxy_protocol), (Some("old"), None));
        let policy = Policy { proxy_protocol: Some(ProxyVersion::V2), ..policy };
        assert!(store.set_policy(crate::core::protocol::MappingKey::tcp(4000), &policy).await.unwrap());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list().await.unwrap()[0].1.proxy_protocol, Some(ProxyVersion::V2));
    }

    #[tokio::test]
    async fn a_database_from_before_policies_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("tunneld.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE mappings (source_port INTEGER PRIMARY KEY, target_host TEXT NOT NULL, target_port INTEGER NOT NULL,
                 use_tunnel INTEGER NOT NULL, created_at INTEGER NOT NULL);
                 INSERT INTO mappings VALUES (4000, 'example.com', 22, 0, 7);",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows = store.list().await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1, Policy::default());
        assert_eq!(rows[0].0.client, None, "a direct mapping has no client");
        assert_eq!(rows[0].0.source, Source::Api, "rows from before declarations were made through the API");
        assert!(store
            .set_policy(crate::core::protocol::MappingKey::tcp(4000), &Policy { description: Some("x".into()), ..Policy::default() })
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn a_database_from_before_udp_is_keyed_by_protocol_and_port() {
        use crate::core::protocol::{MappingKey, Protocol};
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("tunneld.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE mappings (source_port INTEGER PRIMARY KEY, target_host TEXT NOT NULL, target_port INTEGER NOT NULL,
                 use_tunnel INTEGER NOT NULL, created_at INTEGER NOT NULL, policy TEXT NOT NULL DEFAULT '{}', client TEXT,
                 source TEXT NOT NULL DEFAULT 'api');
                 INSERT INTO mappings VALUES (53, '10.0.0.5', 53, 0, 7, '{\"description\":\"dns\"}', NULL, 'config');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows = store.list().await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].0.protocol, rows[0].0.source, rows[0].1.description.as_deref()), (Protocol::Tcp, Source::Config, Some("dns")));
        // UDP 53 beside TCP 53 now.
        let udp = MappingSpec { protocol: Protocol::Udp, ..rows[0].0.clone() };
        store.insert(udp, &Policy::default()).await.unwrap();
        assert!(store.insert(rows[0].0.clone(), &Policy::default()).await.is_err(), "TCP 53 is still taken");
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let protocols: Vec<Protocol> = store.list().await.unwrap().iter().map(|(m, _)| m.protocol).collect();
        assert_eq!(protocols, [Protocol::Tcp, Protocol::Udp]);
        assert!(store.remove(MappingKey { port: 53, protocol: Protocol::Udp }).await.unwrap());
        assert_eq!(store.list().await.unwrap()[0].0.protocol, Protocol::Tcp, "removing UDP 53 leaves TCP 53");
    }

    #[tokio::test]
    async fn a_group_stored_before_udp_survives_the_rebuild_keyed_by_protocol() {
        use crate::core::protocol::Protocol;
        use crate::policy::{Balance, HealthCheck};
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout client groups left: group columns, no protocol.
            let conn = Connection::open(dir.path().join("tunneld.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE mappings (source_port INTEGER PRIMARY KEY, target_host TEXT NOT NULL, target_port INTEGER NOT NULL,
                 use_tunnel INTEGER NOT NULL, created_at INTEGER NOT NULL, policy TEXT NOT NULL DEFAULT '{}', client TEXT,
                 clients TEXT, balance TEXT, health_check TEXT, source TEXT NOT NULL DEFAULT 'api');
                 INSERT INTO mappings VALUES (2222, '10.0.0.5', 22, 1, 7, '{}', 'a', '[\"a\",\"b\"]', 'round_robin',
                   '{\"interval_secs\":5,\"timeout_secs\":2}', 'api');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let spec = store.list().await.unwrap()[0].0.clone();
        assert_eq!(spec.protocol, Protocol::Tcp);
        assert_eq!((spec.clients.as_slice(), spec.balance), (["a".to_string(), "b".to_string()].as_slice(), Balance::RoundRobin));
        assert_eq!(spec.health_check, Some(HealthCheck { interval_secs: 5, timeout_secs: 2 }));
        // A group change reaches the row by port and protocol.
        let changed = MappingSpec { client: Some("b".into()), clients: vec!["b".into()], ..spec };
        assert!(store.set_group(&changed).await.unwrap());
        assert!(!store.set_group(&MappingSpec { protocol: Protocol::Udp, ..changed.clone() }).await.unwrap(), "no UDP 2222");
        assert_eq!(store.list().await.unwrap()[0].0.clients, ["b"]);
    }

    #[tokio::test]
    async fn tunneled_mappings_from_before_named_clients_belong_to_default() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("tunneld.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE mappings (source_port INTEGER PRIMARY KEY, target_host TEXT NOT NULL, target_port INTEGER NOT NULL,
                 use_tunnel INTEGER NOT NULL, created_at INTEGER NOT NULL, policy TEXT NOT NULL DEFAULT '{}');
                 INSERT INTO mappings VALUES (4000, '10.0.0.5', 22, 1, 7, '{}');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list().await.unwrap()[0].0.client.as_deref(), Some("default"));
    }

    #[tokio::test]
    async fn a_mapping_stored_before_groups_loads_as_a_group_of_one_and_groups_survive_reopen() {
        use crate::policy::{Balance, HealthCheck};
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("tunneld.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE mappings (source_port INTEGER PRIMARY KEY, target_host TEXT NOT NULL, target_port INTEGER NOT NULL,
                 use_tunnel INTEGER NOT NULL, created_at INTEGER NOT NULL, policy TEXT NOT NULL DEFAULT '{}', client TEXT);
                 INSERT INTO mappings VALUES (4000, '10.0.0.5', 22, 1, 7, '{}', 'office');
                 INSERT INTO mappings VALUES (4001, '10.0.0.5', 23, 0, 7, '{}', NULL);",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows = store.list().await.unwrap();
        let (tunneled, direct) = (&rows[0].0, &rows[1].0);
        assert_eq!((tunneled.client.as_deref(), tunneled.clients.as_slice()), (Some("office"), &["office".to_string()][..]));
        assert_eq!((tunneled.balance, tunneled.health_check), (Balance::Failover, None));
        assert!(direct.clients.is_empty() && direct.client.is_none(), "a direct mapping has no group");
        let mut group = tunneled.clone();
        group.clients = vec!["office-b".into(), "office".into()];
        group.client = Some("office-b".into());
        group.balance = Balance::RoundRobin;
        group.health_check = Some(HealthCheck { interval_secs: 5, timeout_secs: 2 });
        assert!(store.set_group(&group).await.unwrap());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list().await.unwrap()[0].0, group);
    }

    #[tokio::test]
    async fn clients_survive_reopen_and_names_are_unique() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tunneld.db");
        let office = StoredClient { name: "office".into(), secret: Secret::new("s".repeat(64)), created_at: 3, source: Source::Api };
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert_client(office.clone()).await.unwrap();
            assert!(store.insert_client(office.clone()).await.is_err(), "a name is unique");
        }
        assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600, "secrets inside: private");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600, "tightened");
        assert_eq!(store.clients().await.unwrap(), vec![office]);
        assert!(store.remove_client("office").await.unwrap());
        assert!(!store.remove_client("office").await.unwrap());
        assert!(store.clients().await.unwrap().is_empty());
    }

    #[test]
    fn a_damaged_file_is_named_once_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tunneld.db"), vec![b'x'; 8192]).unwrap();
        let err = Store::open(dir.path()).err().expect("garbage is not a database").to_string();
        assert!(err.contains(&dir.path().join("tunneld.db").display().to_string()), "{err}");
        assert!(err.contains("move the file aside"), "{err}");
        assert_eq!(err.matches("not a database").count(), 1, "{err}");
    }
}
