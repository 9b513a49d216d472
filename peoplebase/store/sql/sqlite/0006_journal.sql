-- Peoplebase schema, version 6 (SQLite): the journal, for writing profile rows behind.
--
-- With `write_behind`, a group commit makes its updates durable as one journal row (the
-- group's requests, journal.py) and writes the changed profile rows later, in key order, a
-- part with every group. A profile row records the newest group it holds (jid: the group's
-- first arrival number, also its journal id), so that replaying the journal after a restart
-- skips what a row holds already. Journal rows are deleted once every row holds them.
CREATE TABLE journal (
    id   INTEGER PRIMARY KEY,
    body BLOB NOT NULL
);
ALTER TABLE profiles ADD COLUMN jid INTEGER NOT NULL DEFAULT 0;
