//! `backstop audit export` and `backstop audit verify`: the compliance export of the ledger and
//! its offline check (format: `docs/FORMAT.md`, "Audit export"; code: `backstop_api::audit_export`).
//!
//! `export` reads the ledger directly, so `backstop serve` must be stopped (sled's lock); while it
//! runs, auditors use `GET /api/audit/export` with an auditor token instead. The file is written
//! to a temporary name beside `--out` and renamed when complete, so a partial file never has the
//! final name.
//!
//! `verify` needs nothing but the file. It should also be given the ledger's public key through
//! another channel (`--pubkey`, or `[ledger] public_key` pinned in the configuration, from
//! `backstop ledger pubkey` run by the operator, or a key published in advance): the key inside
//! the file only proves the file is self-consistent, since whoever forges a whole file can also
//! put their own key in it. A `/2` file also proves that nothing was cut from either end of its
//! range; a `/1` file is read only with `--accept-v1` (see `docs/FORMAT.md`, "Audit export").

use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::Context;
use backstop_api::audit_export::{self, ExportRange, Format};
use backstop_ledger::Ledger;
use clap::Subcommand;

use crate::config::Config;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Export events with their hashes, the signed checkpoint covering them and the public key.
    Export {
        /// Events recorded at or after this time (RFC 3339 or YYYY-MM-DD, UTC midnight).
        #[arg(long)]
        from: Option<String>,
        /// Events recorded before this time.
        #[arg(long)]
        to: Option<String>,
        /// Or by position: the first position to export.
        #[arg(long)]
        from_position: Option<u64>,
        /// The last position of the range.
        #[arg(long)]
        to_position: Option<u64>,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
    },
    /// Check an export offline: every hash, every link, the checkpoint's signature.
    Verify {
        file: PathBuf,
        /// The ledger's public key (hex), obtained separately; default `[ledger] public_key`
        /// from the configuration. Without either, the key inside the file is trusted (a warning).
        #[arg(long)]
        pubkey: Option<String>,
        /// Also accept a `backstop-audit-export/1` file (exported before /2): its events are
        /// checked, but nothing proves none were cut from either end.
        #[arg(long)]
        accept_v1: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    cmd: AuditCommand,
) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        AuditCommand::Export {
            from,
            to,
            from_position,
            to_position,
            out,
            format,
        } => {
            let parse = |s: Option<String>, what: &str| -> anyhow::Result<_> {
                s.map(|s| {
                    backstop_api::params::parse_time(&s)
                        .map_err(|e| anyhow::anyhow!("--{what}: {e}"))
                })
                .transpose()
            };
            let range = ExportRange {
                from: parse(from, "from")?,
                to: parse(to, "to")?,
                from_position,
                to_position,
            };
            let format: Format = format.parse().map_err(anyhow::Error::msg)?;
            let lc = config.ledger_config(data_dir);
            if !lc.path.join("db").exists() {
                anyhow::bail!(
                    "no ledger in {}: pass --data-dir (or, while `backstop serve` runs, use GET /api/audit/export)",
                    lc.path.display()
                );
            }
            let ledger = Ledger::open(&lc).with_context(|| {
                format!(
                    "cannot open the ledger in {} (while `backstop serve` runs, export with GET /api/audit/export and an auditor token)",
                    data_dir.display()
                )
            })?;
            let tmp = out.with_extension("partial");
            let result = (|| -> anyhow::Result<audit_export::Header> {
                let file = std::fs::File::create(&tmp)
                    .with_context(|| format!("cannot create {}", tmp.display()))?;
                let mut w = std::io::BufWriter::new(file);
                let signer = backstop_ledger::CheckpointSigner::load_or_create(&lc.signing_key)?;
                let header = audit_export::export(ledger.store(), &signer, &range, format, &mut w)?;
                let file = w
                    .into_inner()
                    .map_err(|e| anyhow::anyhow!("writing {}: {}", tmp.display(), e.error()))?;
                file.sync_all()?;
                std::fs::rename(&tmp, &out).with_context(|| {
                    format!("cannot rename {} to {}", tmp.display(), out.display())
                })?;
                Ok(header)
            })();
            ledger.close().await;
            let header = match result {
                Ok(h) => h,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            eprintln!(
                "exported events {}..={} ({} events; the range asked for ends at {}) to {}",
                header.first_position,
                header.last_position,
                header.events,
                header.range_last_position,
                out.display()
            );
            eprintln!(
                "signed checkpoint at position {}; public key {}",
                header.last_position, header.public_key
            );
            if header.truncated {
                eprintln!(
                    "note: events after position {} are not covered by a signed checkpoint yet and were left out; export again after the next checkpoint",
                    header.last_position
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            file,
            pubkey,
            accept_v1,
            json,
        } => {
            // The key given on the command line, else the one pinned in the configuration.
            let pubkey = pubkey.or_else(|| config.ledger.public_key.clone());
            let f = std::fs::File::open(&file)
                .with_context(|| format!("cannot open {}", file.display()))?;
            match audit_export::verify_with(BufReader::new(f), pubkey.as_deref(), accept_v1) {
                Ok(v) => {
                    if json {
                        println!("{}", serde_json::json!({ "ok": true, "report": v }));
                    } else {
                        println!(
                            "{}: intact. {} events, positions {}..={}, chained from the event before and signed at position {} ({}).",
                            file.display(),
                            v.events,
                            v.first_position,
                            v.last_position,
                            v.checkpoint_position,
                            v.checkpoint_signed_at
                        );
                        if v.coverage_signed {
                            println!(
                                "complete: the range asked for is positions {}..={}; {} and a checkpoint at {}, and the ledger's signed statement, prove nothing was cut from either end{}.",
                                v.range_first_position,
                                v.range_last_position,
                                match v.opening_checkpoint_position {
                                    Some(p) => format!("a signed checkpoint at {p}"),
                                    None => "the ledger's first event".to_string(),
                                },
                                v.checkpoint_position,
                                if v.truncated {
                                    " (the export stopped at the latest checkpoint: later events were not covered yet)"
                                } else {
                                    ""
                                }
                            );
                        } else {
                            println!(
                                "warning: a {} file: its events are unaltered, but nothing proves none were cut from either end; export again to get a {} file.",
                                v.version,
                                audit_export::FORMAT
                            );
                        }
                        if v.key_given {
                            println!(
                                "signature checked with the public key you gave: {}",
                                v.public_key
                            );
                        } else {
                            println!(
                                "warning: the signature was checked with the public key inside the file ({}). A forger can replace that key; compare it with the ledger's key (`backstop ledger pubkey`) or pass --pubkey.",
                                v.public_key
                            );
                        }
                    }
                    Ok(std::process::ExitCode::SUCCESS)
                }
                Err(e) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({ "ok": false, "line": e.line, "problem": e.what })
                        );
                    } else {
                        println!(
                            "{}: NOT intact: line {}: {}",
                            file.display(),
                            e.line,
                            e.what
                        );
                    }
                    Ok(std::process::ExitCode::FAILURE)
                }
            }
        }
    }
}
