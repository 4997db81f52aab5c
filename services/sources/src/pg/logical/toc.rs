//! Reading the table of contents of a `pg_dump` custom-format archive, and choosing the entries
//! a table-level restore needs.
//!
//! # Format read (archive versions 1.12 to 1.16; PostgreSQL 11 to 17 write these)
//! `PGDMP`, version bytes major/minor/revision, int size, offset size, format (1 = custom);
//! compression (1.15+: one byte; before: an int); creation time (7 ints); database name, server
//! version and pg_dump version (strings); entry count (int); then per entry: dump id, had-dumper,
//! catalog table oid (string), oid (string), tag, desc, section (int), definition, drop statement,
//! copy statement, namespace, tablespace, table access method (1.14+), relkind (int, 1.16+),
//! owner, "with oids" (string), the dependency dump ids (strings, ended by a null string), and
//! the custom format's data offset (flag byte + offset size bytes). An int is a sign byte then
//! `int size` bytes, least significant first; a string is an int length (-1 = null) then bytes.
//!
//! # Choosing entries for chosen tables
//! Relations (`TABLE`, `VIEW`, `MATERIALIZED VIEW`, `FOREIGN TABLE`) other than the chosen
//! tables are left out, and so are large objects. A `SEQUENCE` is kept when it belongs to a chosen
//! table (it depends on the table, as owned and identity sequences do) or a kept table or default
//! uses it. Then everything that depends, directly or through other entries, on a left-out entry
//! is left out too: indexes, constraints, defaults, triggers, rules, policies, comments and grants
//! of other tables, foreign keys to them, views over them, functions returning their row type.
//! Everything else (schemas, types, functions, extensions, ...) is kept.
//!
//! One exception: a chosen partition whose parent is not chosen is restored as a standalone table.
//! Its dependencies on the parent (the table itself, and its index and constraint attached to the
//! parent's) are ignored; the `TABLE ATTACH` and `INDEX ATTACH` entries that need the parent are
//! left out. A chosen table that still needs a left-out entry (a table inheriting from a table not
//! chosen, say) is an error naming what is missing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::error::SourceError;
use crate::pg::names::QualifiedName;

/// Archive section of an entry (pg_backup.h: teSection).
pub(crate) const SECTION_PRE_DATA: i64 = 2;

/// One TOC entry (the fields a restore decision needs).
#[derive(Debug, Clone)]
pub(crate) struct TocEntry {
    pub dump_id: i64,
    pub desc: String,
    pub tag: String,
    pub namespace: Option<String>,
    pub section: i64,
    pub deps: Vec<i64>,
}

/// The table of contents of a custom-format archive.
#[derive(Debug, Clone)]
pub(crate) struct Toc {
    pub dump_version: String,
    pub entries: Vec<TocEntry>,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    int_size: usize,
}

impl Reader<'_> {
    fn fail(&self, what: &str) -> SourceError {
        SourceError::Archive {
            why: format!("{what} at byte {}", self.pos),
        }
    }

    fn byte(&mut self) -> Result<u8, SourceError> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or_else(|| self.fail("unexpected end of archive"))?;
        self.pos += 1;
        Ok(b)
    }

    /// Bytes left after `pos` (`pos` never passes the end: every step is checked first).
    fn left(&self) -> usize {
        self.data.len() - self.pos
    }

    fn skip(&mut self, n: usize) -> Result<(), SourceError> {
        if n > self.left() {
            return Err(self.fail("unexpected end of archive"));
        }
        self.pos += n;
        Ok(())
    }

    fn int(&mut self) -> Result<i64, SourceError> {
        let negative = self.byte()? != 0;
        let mut v: i64 = 0;
        for i in 0..self.int_size {
            let b = i64::from(self.byte()?);
            if i < 8 {
                v |= b << (8 * i);
            }
        }
        // i64::MIN has no negation: pg_dump never writes it, so it is damage, not a value.
        match negative {
            true => v
                .checked_neg()
                .ok_or_else(|| self.fail("integer out of range")),
            false => Ok(v),
        }
    }

    fn string(&mut self) -> Result<Option<String>, SourceError> {
        let len = self.int()?;
        if len < 0 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| self.fail("bad string length"))?;
        if len > self.left() {
            return Err(self.fail("string runs past the end of the archive"));
        }
        let s = String::from_utf8_lossy(&self.data[self.pos..self.pos + len]).into_owned();
        self.pos += len;
        Ok(Some(s))
    }
}

/// Parses the header and TOC of a custom-format archive (the data blocks are not needed).
pub(crate) fn parse(data: &[u8]) -> Result<Toc, SourceError> {
    if data.len() < 5 || &data[..5] != b"PGDMP" {
        return Err(SourceError::Archive {
            why: "not a pg_dump custom-format archive (no PGDMP magic)".into(),
        });
    }
    let mut r = Reader {
        data,
        pos: 5,
        int_size: 4,
    };
    let version = (r.byte()?, r.byte()?, r.byte()?);
    if !((1, 12, 0)..=(1, 16, 255)).contains(&version) {
        return Err(SourceError::Archive {
            why: format!(
                "archive version {}.{}.{} is not supported (1.12 to 1.16 are)",
                version.0, version.1, version.2
            ),
        });
    }
    r.int_size = usize::from(r.byte()?);
    if r.int_size == 0 || r.int_size > 32 {
        return Err(r.fail("implausible integer size"));
    }
    let off_size = usize::from(r.byte()?);
    let format = r.byte()?;
    if format != 1 {
        return Err(SourceError::Archive {
            why: format!("archive format {format} is not custom format (1)"),
        });
    }
    if version >= (1, 15, 0) {
        r.byte()?;
    } else {
        r.int()?;
    }
    for _ in 0..7 {
        r.int()?;
    }
    let _dbname = r.string()?;
    let _server_version = r.string()?;
    let dump_version = r.string()?.unwrap_or_default();
    let count = r.int()?;
    if !(0..=50_000_000).contains(&count) {
        return Err(r.fail("implausible entry count"));
    }
    // The count is the archive's word: reserve no more than the bytes left could hold (every
    // entry is at least one integer), so a few bytes cannot claim gigabytes.
    let mut entries = Vec::with_capacity((count as usize).min(r.left() / (1 + r.int_size)));
    for _ in 0..count {
        let dump_id = r.int()?;
        let _had_dumper = r.int()?;
        let _table_oid = r.string()?;
        let _oid = r.string()?;
        let tag = r.string()?.unwrap_or_default();
        let desc = r.string()?.unwrap_or_default();
        let section = r.int()?;
        let _defn = r.string()?;
        let _drop = r.string()?;
        let _copy = r.string()?;
        let namespace = r.string()?;
        let _tablespace = r.string()?;
        if version >= (1, 14, 0) {
            let _tableam = r.string()?;
        }
        if version >= (1, 16, 0) {
            let _relkind = r.int()?;
        }
        let _owner = r.string()?;
        let _with_oids = r.string()?;
        let mut deps = Vec::new();
        while let Some(d) = r.string()? {
            deps.push(
                d.trim()
                    .parse()
                    .map_err(|_| r.fail("non-numeric dependency"))?,
            );
        }
        // Custom format: the data block's state flag and offset.
        r.byte()?;
        r.skip(off_size)?;
        entries.push(TocEntry {
            dump_id,
            desc,
            tag,
            namespace,
            section,
            deps,
        });
    }
    Ok(Toc {
        dump_version,
        entries,
    })
}

const RELATION_DESCS: [&str; 4] = ["TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE"];
const LARGE_OBJECT_DESCS: [&str; 3] = ["BLOB", "BLOB METADATA", "BLOBS"];

/// What a table-level restore keeps of the archive.
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    /// Dump ids to restore, in archive order.
    pub keep: Vec<i64>,
    /// Sequences kept (their values are to be set).
    pub sequences: BTreeSet<QualifiedName>,
    /// Entries kept per section, for reports.
    pub pre_data: usize,
    pub post_data: usize,
}

impl Selection {
    /// A `pg_restore -L` list: one id per line; the text after `;` is a comment for people.
    pub fn list_file(&self, toc: &Toc) -> String {
        let by_id: BTreeMap<i64, &TocEntry> = toc.entries.iter().map(|e| (e.dump_id, e)).collect();
        let mut out = String::new();
        for id in &self.keep {
            let (desc, tag) = by_id
                .get(id)
                .map(|e| (e.desc.as_str(), e.tag.as_str()))
                .unwrap_or(("", ""));
            let comment: String = format!("{desc} {tag}")
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            out.push_str(&format!("{id}; {comment}\n"));
        }
        out
    }
}

fn name_of(e: &TocEntry) -> Option<QualifiedName> {
    e.namespace
        .as_ref()
        .map(|ns| QualifiedName::new(ns.clone(), e.tag.clone()))
}

fn describe(e: &TocEntry) -> String {
    match &e.namespace {
        Some(ns) => format!(
            "{} {}",
            e.desc,
            QualifiedName::new(ns.clone(), e.tag.clone())
        ),
        None => format!("{} {}", e.desc, e.tag),
    }
}

/// Chooses the entries that restore exactly `chosen` (tables, partitions included as listed).
pub(crate) fn select(
    toc: &Toc,
    chosen: &BTreeSet<QualifiedName>,
) -> Result<Selection, SourceError> {
    let by_id: BTreeMap<i64, &TocEntry> = toc.entries.iter().map(|e| (e.dump_id, e)).collect();
    let is_table = |id: &i64| by_id.get(id).is_some_and(|e| e.desc == "TABLE");

    // The chosen tables' entries; every chosen table must be in the archive.
    let mut chosen_ids: BTreeSet<i64> = BTreeSet::new();
    for e in toc.entries.iter().filter(|e| e.desc == "TABLE") {
        if name_of(e).is_some_and(|n| chosen.contains(&n)) {
            chosen_ids.insert(e.dump_id);
        }
    }
    for t in chosen {
        let found = toc
            .entries
            .iter()
            .any(|e| e.desc == "TABLE" && name_of(e).as_ref() == Some(t));
        if !found {
            return Err(SourceError::BadReport {
                why: format!("table {t} is listed in the dump but missing from its schema archive"),
            });
        }
    }

    // Tables each entry belongs to: itself for a table, else the tables among its dependencies.
    let owners = |e: &TocEntry| -> BTreeSet<i64> {
        if e.desc == "TABLE" {
            BTreeSet::from([e.dump_id])
        } else {
            e.deps.iter().copied().filter(is_table).collect()
        }
    };

    // Sequences: kept when they belong to, or are used by, what is kept.
    let mut kept_sequences: BTreeSet<i64> = BTreeSet::new();
    for e in toc.entries.iter().filter(|e| e.desc == "SEQUENCE") {
        if e.deps.iter().any(|d| chosen_ids.contains(d)) {
            kept_sequences.insert(e.dump_id);
        }
    }
    for e in &toc.entries {
        let user = (e.desc == "TABLE" && chosen_ids.contains(&e.dump_id))
            || (e.desc == "DEFAULT" && {
                let o = owners(e);
                !o.is_empty() && o.is_subset(&chosen_ids)
            });
        if user {
            for d in &e.deps {
                if by_id.get(d).is_some_and(|s| s.desc == "SEQUENCE") {
                    kept_sequences.insert(*d);
                }
            }
        }
    }

    // Partition child -> parent, from TABLE ATTACH entries.
    let mut parent_of: BTreeMap<i64, i64> = BTreeMap::new();
    for e in toc.entries.iter().filter(|e| e.desc == "TABLE ATTACH") {
        let tables: Vec<i64> = e.deps.iter().copied().filter(is_table).collect();
        let child = tables.iter().copied().find(|id| {
            by_id
                .get(id)
                .is_some_and(|t| t.tag == e.tag && t.namespace == e.namespace)
        });
        if let Some(child) = child
            && let Some(parent) = tables.iter().copied().find(|id| *id != child)
        {
            parent_of.insert(child, parent);
        }
    }
    // Sequences created standalone and tied to their table by a separate `SEQUENCE OWNED BY`
    // entry (serial columns), as opposed to identity sequences, created by `ALTER TABLE`.
    let mut owned_by: BTreeMap<i64, i64> = BTreeMap::new(); // sequence -> its OWNED BY entry
    for e in toc.entries.iter().filter(|e| e.desc == "SEQUENCE OWNED BY") {
        for d in &e.deps {
            if by_id.get(d).is_some_and(|s| s.desc == "SEQUENCE") {
                owned_by.insert(*d, e.dump_id);
            }
        }
    }
    let kept_sequences = &kept_sequences;
    // Edges that only order things and need not hold for a table-level restore: a partition's
    // objects to its parent's (the attach is left out), and a standalone sequence still used by a
    // chosen table to the table that owns it (the OWNED BY is left out).
    let ignorable = |e: &TocEntry, dep: &TocEntry| -> bool {
        if e.desc == "SEQUENCE"
            && dep.desc == "TABLE"
            && kept_sequences.contains(&e.dump_id)
            && owned_by.contains_key(&e.dump_id)
        {
            return true;
        }
        let (eo, doo) = (owners(e), owners(dep));
        match (eo.iter().next(), doo.iter().next()) {
            (Some(c), Some(p)) if eo.len() == 1 && doo.len() == 1 => parent_of.get(c) == Some(p),
            _ => false,
        }
    };

    // The roots left out, then everything depending on them.
    let mut excluded: BTreeMap<i64, i64> = BTreeMap::new(); // entry -> the left-out entry it needs
    let mut queue: VecDeque<i64> = VecDeque::new();
    for e in &toc.entries {
        let out = (RELATION_DESCS.contains(&e.desc.as_str()) && !chosen_ids.contains(&e.dump_id))
            || (e.desc == "SEQUENCE" && !kept_sequences.contains(&e.dump_id))
            || (e.desc == "SEQUENCE OWNED BY"
                && e.deps.iter().any(|seq| {
                    by_id.get(seq).is_some_and(|s| {
                        s.desc == "SEQUENCE"
                            && s.deps
                                .iter()
                                .any(|t| is_table(t) && !chosen_ids.contains(t))
                    })
                }))
            || LARGE_OBJECT_DESCS.contains(&e.desc.as_str())
            || e.desc == "TABLE DATA"
            || e.desc == "SEQUENCE SET";
        if out {
            excluded.insert(e.dump_id, e.dump_id);
            queue.push_back(e.dump_id);
        }
    }
    let mut dependents: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for e in &toc.entries {
        for d in &e.deps {
            dependents.entry(*d).or_default().push(e.dump_id);
        }
    }
    while let Some(gone) = queue.pop_front() {
        let Some(gone_entry) = by_id.get(&gone) else {
            continue;
        };
        for dependent in dependents.get(&gone).into_iter().flatten() {
            if excluded.contains_key(dependent) {
                continue;
            }
            let Some(dep_entry) = by_id.get(dependent) else {
                continue;
            };
            if ignorable(dep_entry, gone_entry) {
                continue;
            }
            excluded.insert(*dependent, gone);
            queue.push_back(*dependent);
        }
    }

    // A chosen table must survive; if not, name the left-out entry at the root of the chain.
    for id in &chosen_ids {
        if let Some(mut cause) = excluded.get(id).copied() {
            let mut guard = 0;
            while let Some(next) = excluded.get(&cause).copied() {
                if next == cause || guard > 10_000 {
                    break;
                }
                cause = next;
                guard += 1;
            }
            let table = by_id.get(id).map(|e| describe(e)).unwrap_or_default();
            let needs = by_id.get(&cause).map(|e| describe(e)).unwrap_or_default();
            return Err(SourceError::MissingDependency {
                table: table.trim_start_matches("TABLE ").to_string(),
                needs,
            });
        }
    }

    let mut sel = Selection {
        keep: Vec::new(),
        sequences: BTreeSet::new(),
        pre_data: 0,
        post_data: 0,
    };
    for e in &toc.entries {
        if excluded.contains_key(&e.dump_id) {
            continue;
        }
        sel.keep.push(e.dump_id);
        if e.section == SECTION_PRE_DATA {
            sel.pre_data += 1;
        } else {
            sel.post_data += 1;
        }
        if e.desc == "SEQUENCE"
            && let Some(n) = name_of(e)
        {
            sel.sequences.insert(n);
        }
    }
    Ok(sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: i64, desc: &str, ns: &str, tag: &str, deps: &[i64]) -> TocEntry {
        TocEntry {
            dump_id: id,
            desc: desc.into(),
            tag: tag.into(),
            namespace: if ns.is_empty() { None } else { Some(ns.into()) },
            section: if [
                "CONSTRAINT",
                "INDEX",
                "FK CONSTRAINT",
                "TRIGGER",
                "INDEX ATTACH",
            ]
            .contains(&desc)
            {
                4
            } else {
                2
            },
            deps: deps.to_vec(),
        }
    }

    /// The shape `pg_dump` produced for a schema with serials, identities, partitions,
    /// inheritance, a view, foreign keys, comments and grants (see the integration tests for
    /// the real thing).
    fn sample() -> Toc {
        Toc {
            dump_version: "15".into(),
            entries: vec![
                entry(1, "ENCODING", "", "ENCODING", &[]),
                entry(7, "SCHEMA", "", "We.ird", &[]),
                entry(889, "TYPE", "public", "mood", &[]),
                entry(266, "FUNCTION", "public", "touch()", &[]),
                entry(217, "TABLE", "public", "accounts", &[889]),
                entry(3485, "COMMENT", "public", "TABLE accounts", &[217]),
                entry(3486, "ACL", "public", "TABLE accounts", &[217]),
                entry(216, "SEQUENCE", "public", "accounts_id_seq", &[217]),
                entry(221, "SEQUENCE", "public", "standalone_seq", &[]),
                entry(222, "TABLE", "public", "uses_seq", &[221]),
                entry(229, "TABLE", "public", "child_inh", &[222]),
                entry(223, "TABLE", "public", "events", &[]),
                entry(224, "TABLE", "public", "events_2025", &[223]),
                entry(219, "TABLE", "public", "orders", &[]),
                entry(226, "VIEW", "public", "order_view", &[217, 219]),
                entry(218, "SEQUENCE", "public", "orders_id_seq", &[219]),
                entry(3490, "SEQUENCE OWNED BY", "public", "orders_id_seq", &[218]),
                entry(3285, "TABLE ATTACH", "public", "events_2025", &[224, 223]),
                entry(3288, "DEFAULT", "public", "orders id", &[219, 218, 219]),
                entry(3289, "DEFAULT", "public", "uses_seq x", &[222, 218]),
                entry(3476, "BLOB", "", "16518", &[]),
                entry(
                    3295,
                    "CONSTRAINT",
                    "public",
                    "accounts accounts_pkey",
                    &[217],
                ),
                entry(3303, "CONSTRAINT", "public", "events events_pkey", &[223]),
                entry(
                    3306,
                    "CONSTRAINT",
                    "public",
                    "events_2025 events_2025_pkey",
                    &[224, 3303],
                ),
                entry(3301, "INDEX", "public", "events_at", &[223]),
                entry(3304, "INDEX", "public", "events_2025_at_idx", &[3301, 224]),
                entry(
                    3310,
                    "INDEX ATTACH",
                    "public",
                    "events_2025_at_idx",
                    &[3304, 3301, 224, 223],
                ),
                entry(
                    3316,
                    "TRIGGER",
                    "public",
                    "accounts accounts_touch",
                    &[217, 266],
                ),
                entry(
                    3315,
                    "FK CONSTRAINT",
                    "public",
                    "orders orders_account_id_fkey",
                    &[217, 3295, 219],
                ),
            ],
        }
    }

    fn names(list: &[&str]) -> BTreeSet<QualifiedName> {
        list.iter()
            .map(|n| QualifiedName::new("public", *n))
            .collect()
    }

    /// The header of a custom-format archive, version 1.14, 4-byte integers, up to the entry
    /// count, which is `count` (sign byte, then little-endian).
    fn header(count: &[u8]) -> Vec<u8> {
        let int = |v: u8| [0, v, 0, 0, 0];
        let mut b = b"PGDMP".to_vec();
        b.extend_from_slice(&[1, 14, 0, 4, 8, 1]);
        b.extend_from_slice(&int(0)); // compression
        for _ in 0..7 {
            b.extend_from_slice(&int(0)); // the dump's time
        }
        for s in ["db", "15.0", "15.0"] {
            b.extend_from_slice(&int(s.len() as u8));
            b.extend_from_slice(s.as_bytes());
        }
        b.extend_from_slice(count);
        b
    }

    /// A string longer than the archive is refused; the negation of i64::MIN (found while
    /// writing the `pg_toc` fuzz target) overflowed.
    #[test]
    fn huge_lengths_and_the_most_negative_integer_are_typed_errors() {
        let mut b = header(&[0, 1, 0, 0, 0]);
        b.extend_from_slice(&[0, 1, 0, 0, 0]); // dump id
        b.extend_from_slice(&[0, 0, 0, 0, 0]); // had dumper
        b.push(0); // table oid: a length of ...
        b.extend_from_slice(&[0xff; 4]); // ... 4 GiB - 1
        let e = parse(&b).expect_err("a string past the end");
        assert!(e.to_string().contains("past the end"), "{e}");

        let mut r = Reader {
            data: &[1, 0, 0, 0, 0, 0, 0, 0, 0x80],
            pos: 0,
            int_size: 8,
        };
        let e = r.int().expect_err("-i64::MIN");
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    /// Found while writing the `pg_toc` fuzz target: a count of 50,000,000 entries in a few
    /// bytes reserved gigabytes before the first entry was read.
    #[test]
    fn an_entry_count_the_archive_cannot_hold_fails_without_reserving_it() {
        let b = header(&[0, 0x80, 0xf0, 0xfa, 0x02]); // 50,000,000
        let e = parse(&b).expect_err("no entries follow");
        assert!(e.to_string().contains("unexpected end"), "{e}");
    }

    #[test]
    fn orders_alone_keeps_its_sequence_default_and_not_the_fk_or_view() {
        let sel = select(&sample(), &names(&["orders"])).unwrap();
        let keep: BTreeSet<i64> = sel.keep.iter().copied().collect();
        for id in [1, 7, 889, 266, 219, 218, 3490, 3288] {
            assert!(keep.contains(&id), "{id} should be kept: {keep:?}");
        }
        for id in [217, 226, 3315, 3476, 3295, 3316, 216, 221, 222] {
            assert!(!keep.contains(&id), "{id} should be left out");
        }
        assert_eq!(sel.sequences, names(&["orders_id_seq"]));
    }

    #[test]
    fn both_ends_keep_the_foreign_key_and_identity_sequences() {
        let sel = select(&sample(), &names(&["orders", "accounts"])).unwrap();
        let keep: BTreeSet<i64> = sel.keep.iter().copied().collect();
        for id in [3315, 3295, 3316, 3485, 3486, 216, 218] {
            assert!(keep.contains(&id), "{id} should be kept");
        }
        assert!(!keep.contains(&226), "the view is not a chosen table");
    }

    #[test]
    fn a_default_nextval_keeps_a_standalone_sequence() {
        let sel = select(&sample(), &names(&["uses_seq"])).unwrap();
        assert!(sel.keep.contains(&221));
        assert!(
            sel.sequences
                .contains(&QualifiedName::new("public", "standalone_seq"))
        );
        // uses_seq also draws from orders' serial sequence: kept, but not its OWNED BY orders.
        assert!(sel.keep.contains(&218) && sel.keep.contains(&3289));
        assert!(!sel.keep.contains(&3490) && !sel.keep.contains(&3288));
    }

    #[test]
    fn a_partition_without_its_parent_is_standalone() {
        let sel = select(&sample(), &names(&["events_2025"])).unwrap();
        let keep: BTreeSet<i64> = sel.keep.iter().copied().collect();
        assert!(keep.contains(&224) && keep.contains(&3306) && keep.contains(&3304));
        assert!(!keep.contains(&3285) && !keep.contains(&3310) && !keep.contains(&223));
        let sel = select(&sample(), &names(&["events_2025", "events"])).unwrap();
        assert!(sel.keep.contains(&3285) && sel.keep.contains(&3310));
    }

    #[test]
    fn an_inheritance_child_without_its_parent_is_refused_by_name() {
        let err = select(&sample(), &names(&["child_inh"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("public.child_inh"), "{err}");
        assert!(err.contains("TABLE public.uses_seq"), "{err}");
    }
}
