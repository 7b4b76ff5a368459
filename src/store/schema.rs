//! Every table of the state database in one place, with the migrations that
//! bring an older database up to date. Run once when the database is opened.

use rusqlite::Connection;

/// The bucket tables, finest first.
pub(super) const MAPPING_TABLES: [&str; 3] = ["history_minute", "history_hour", "history_day"];
pub(super) const TUNNEL_TABLES: [&str; 3] = ["tunnel_history_minute", "tunnel_history_hour", "tunnel_history_day"];

/// Creates whatever is missing and migrates older layouts.
pub(super) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS mappings (
            source_port INTEGER PRIMARY KEY CHECK (source_port BETWEEN 1 AND 65535),
            target_host TEXT NOT NULL,
            target_port INTEGER NOT NULL CHECK (target_port BETWEEN 1 AND 65535),
            use_tunnel  INTEGER NOT NULL,
            created_at  INTEGER NOT NULL
        );",
    )?;
    migrate_mapping_columns(conn)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS clients (
            name       TEXT PRIMARY KEY,
            secret     TEXT NOT NULL,
            created_at INTEGER NOT NULL
        );",
    )?;
    migrate_source_columns(conn)?;
    migrate_mapping_protocol(conn)?;
    create_history(conn)?;
    create_events(conn)?;
    create_connection_log(conn)
}

/// Databases made before mappings had a policy get the column, empty (`{}`);
/// those made before named clients get the `client` column, with their tunneled
/// mappings belonging to `default`, the one client there was; those made before
/// client groups get the group's columns, empty (each mapping a group of one).
fn migrate_mapping_columns(conn: &Connection) -> rusqlite::Result<()> {
    let has = |column: &str| conn.prepare("SELECT 1 FROM pragma_table_info('mappings') WHERE name = ?1")?.exists([column]);
    if !has("policy")? {
        conn.execute_batch("ALTER TABLE mappings ADD COLUMN policy TEXT NOT NULL DEFAULT '{}'")?;
    }
    if !has("client")? {
        conn.execute_batch(
            "ALTER TABLE mappings ADD COLUMN client TEXT;
             UPDATE mappings SET client = 'default' WHERE use_tunnel != 0;",
        )?;
    }
    // Client groups: a row without `clients` is a group of one, its `client`
    // (read so in `Store::list`), failing over as the one client always did.
    if !has("clients")? {
        conn.execute_batch(
            "ALTER TABLE mappings ADD COLUMN clients TEXT;
             ALTER TABLE mappings ADD COLUMN balance TEXT;
             ALTER TABLE mappings ADD COLUMN health_check TEXT;",
        )?;
    }
    Ok(())
}

/// Databases made before mappings and clients could be declared in the config
/// file get a `source` column: every row they hold was made through the API.
fn migrate_source_columns(conn: &Connection) -> rusqlite::Result<()> {
    for table in ["mappings", "clients"] {
        let has = conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = 'source'"))?.exists([])?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN source TEXT NOT NULL DEFAULT 'api'"))?;
        }
    }
    Ok(())
}

/// Databases made before UDP mappings key mappings by the port alone: the
/// table is rebuilt keyed by `(protocol, source_port)`, every row it held a TCP
/// mapping, so UDP 53 and TCP 53 can both be stored. Runs after the column
/// migrations, so the old table has every column copied. One transaction: a
/// crash midway leaves the old table as it was.
fn migrate_mapping_protocol(conn: &Connection) -> rusqlite::Result<()> {
    let has = conn.prepare("SELECT 1 FROM pragma_table_info('mappings') WHERE name = 'protocol'")?.exists([])?;
    if has {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE mappings_by_protocol (
            source_port INTEGER NOT NULL CHECK (source_port BETWEEN 1 AND 65535),
            protocol    TEXT NOT NULL DEFAULT 'tcp' CHECK (protocol IN ('tcp', 'udp')),
            target_host TEXT NOT NULL,
            target_port INTEGER NOT NULL CHECK (target_port BETWEEN 1 AND 65535),
            use_tunnel  INTEGER NOT NULL,
            created_at  INTEGER NOT NULL,
            policy      TEXT NOT NULL DEFAULT '{}',
            client      TEXT,
            clients     TEXT,
            balance     TEXT,
            health_check TEXT,
            source      TEXT NOT NULL DEFAULT 'api',
            PRIMARY KEY (protocol, source_port)
         );
         INSERT INTO mappings_by_protocol
            (source_port, protocol, target_host, target_port, use_tunnel, created_at, policy, client, clients, balance, health_check, source)
            SELECT source_port, 'tcp', target_host, target_port, use_tunnel, created_at, policy, client, clients, balance, health_check, source
            FROM mappings;
         DROP TABLE mappings;
         ALTER TABLE mappings_by_protocol RENAME TO mappings;
         COMMIT;",
    )
}

fn create_history(conn: &Connection) -> rusqlite::Result<()> {
    let mut sql = String::new();
    for table in MAPPING_TABLES {
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                t INTEGER NOT NULL, port INTEGER NOT NULL,
                sent INTEGER NOT NULL, received INTEGER NOT NULL,
                PRIMARY KEY (t, port)) WITHOUT ROWID;"
        ));
    }
    for table in TUNNEL_TABLES {
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                t INTEGER NOT NULL, client TEXT NOT NULL,
                sent INTEGER NOT NULL, received INTEGER NOT NULL,
                PRIMARY KEY (t, client)) WITHOUT ROWID;"
        ));
    }
    sql.push_str(
        "CREATE TABLE IF NOT EXISTS history_lifetime (
            port INTEGER PRIMARY KEY, sent INTEGER NOT NULL, received INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS history_coverage (t INTEGER PRIMARY KEY) WITHOUT ROWID;
         -- One row per recorder run (process): when it started, when it last wrote.
         CREATE TABLE IF NOT EXISTS history_runs (started INTEGER PRIMARY KEY, last INTEGER NOT NULL) WITHOUT ROWID;",
    );
    conn.execute_batch(&sql)
}

fn create_events(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS events (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            time    REAL NOT NULL,
            kind    TEXT NOT NULL,
            port    INTEGER,
            client  TEXT,
            message TEXT NOT NULL
        );",
    )
}

/// Ended connections (the connection log): one row each, by when they ended and by port.
fn create_connection_log(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS connection_log (
            id INTEGER PRIMARY KEY,
            port INTEGER NOT NULL,
            client TEXT,
            source TEXT NOT NULL,
            source_ip TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL NOT NULL,
            bytes_sent INTEGER NOT NULL,
            bytes_received INTEGER NOT NULL,
            end_reason TEXT NOT NULL,
            reason TEXT
         );
         CREATE INDEX IF NOT EXISTS connection_log_ended ON connection_log (ended_at);
         CREATE INDEX IF NOT EXISTS connection_log_port_ended ON connection_log (port, ended_at);",
    )?;
    // Logs made before UDP mappings hold TCP connections only.
    let has = conn.prepare("SELECT 1 FROM pragma_table_info('connection_log') WHERE name = 'protocol'")?.exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE connection_log ADD COLUMN protocol TEXT NOT NULL DEFAULT 'tcp'")?;
    }
    Ok(())
}
