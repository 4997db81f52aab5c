-- Objects beyond trading.sql that a logical backup must carry faithfully: odd names, an
-- extension, enum and domain types, identity and serial columns, a standalone sequence used by a
-- default, partitions, inheritance, a view and a materialized view, foreign keys, triggers,
-- comments, grants, row security, extended statistics, rules, generated columns, embedded
-- newlines/tabs/backslashes/NULLs, bytea, an unlogged table and a large object.
\set ON_ERROR_STOP on
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE SCHEMA "We.ird";
CREATE TYPE mood AS ENUM ('up', 'down');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.updated := now(); RETURN NEW; END$$;
CREATE TABLE accounts (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text UNIQUE, m mood,
  q posint, updated timestamptz, twice int GENERATED ALWAYS AS (q * 2) STORED);
CREATE TABLE orders (id bigserial PRIMARY KEY, account_id int REFERENCES accounts(id),
  note text CHECK (length(note) < 100), amount double precision, at timestamptz DEFAULT now());
CREATE INDEX orders_acc ON orders(account_id);
CREATE TRIGGER accounts_touch BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION touch();
COMMENT ON TABLE accounts IS 'customer accounts';
COMMENT ON COLUMN orders.note IS 'free text';
COMMENT ON INDEX orders_acc IS 'by account';
DO $$BEGIN CREATE ROLE backstop_reader; EXCEPTION WHEN duplicate_object THEN NULL; END$$;
GRANT SELECT ON accounts TO backstop_reader;
GRANT SELECT (note) ON orders TO backstop_reader;
CREATE TABLE "We.ird"."Mixed Case" (k text PRIMARY KEY, v bytea, "Quote""d" text);
CREATE SEQUENCE standalone_seq START 500;
CREATE TABLE uses_seq (id int DEFAULT nextval('standalone_seq'), x text);
CREATE TABLE events (id bigint, at date, payload text) PARTITION BY RANGE (at);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX events_at ON events(at);
ALTER TABLE events ADD PRIMARY KEY (id, at);
CREATE VIEW order_view AS SELECT o.id, a.name FROM orders o JOIN accounts a ON a.id = o.account_id;
CREATE MATERIALIZED VIEW acc_mv AS SELECT count(*) AS n FROM accounts;
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY p1 ON orders USING (true);
CREATE STATISTICS st1 ON id, account_id FROM orders;
CREATE RULE r1 AS ON DELETE TO uses_seq DO INSTEAD NOTHING;
CREATE UNLOGGED TABLE scratch (a int, b text);
CREATE TABLE child_inh (extra int) INHERITS (uses_seq);
INSERT INTO accounts (name, m, q) SELECT 'acct ' || g, (array['up','down'])[1 + g % 2]::mood, 1 + g % 7
  FROM generate_series(1, 300) g;
INSERT INTO orders (account_id, note, amount, at)
  SELECT 1 + g % 300, CASE g % 5 WHEN 0 THEN NULL WHEN 1 THEN E'line1\nline2\ttab\\back' ELSE 'n' || g END,
         g / 7.0, timestamptz '2026-01-02 00:00:00+00' + g * interval '1 minute'
  FROM generate_series(1, 5000) g;
INSERT INTO "We.ird"."Mixed Case" VALUES ('k1', '\x00ff', 'a"b'), (E'new\nline', NULL, NULL), ('\N', '\x', '');
INSERT INTO uses_seq (x) VALUES ('a'), ('b');
INSERT INTO child_inh (x, extra) VALUES ('c', 1);
INSERT INTO events SELECT g, date '2025-06-01' + (g % 400), md5(g::text) FROM generate_series(1, 3000) g;
INSERT INTO scratch SELECT g, 'tmp' FROM generate_series(1, 100) g;
REFRESH MATERIALIZED VIEW acc_mv;
SELECT lo_from_bytea(0, 'hello large object') IS NOT NULL AS lo;
