-- The Raft log of one controller node. Entries are openraft entries encoded as JSON.
CREATE TABLE log (
    idx   INTEGER PRIMARY KEY,
    entry BLOB NOT NULL
);

-- vote, last_purged: JSON values keyed by name.
CREATE TABLE log_meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
