//! What the backup storage costs (seed 000 R12): a price table, the monthly estimate from the
//! sampled usage, a daily trend, and retention recommendations computed from the real backups.
//!
//! - **Prices** ([`PriceTable`]): USD per GiB-month (2^30 bytes) per storage class and region.
//!   `[[cost.prices]]` entries come first, then the built-in list prices ([`DEFAULT_PRICES`]).
//!   A class matches case-insensitively; a price with region `*` (or none) matches any region,
//!   and an exact region wins over `*`.
//! - **Estimate** ([`monthly_estimate`]): the latest `storage.usage_sampled` of each series
//!   (repository, region, storage class) times its price; the primary and every replica are
//!   series of their own (each sampled where it is stored), summed per region by [`by_region`]
//!   (R14.5). A series with no price counts 0 and is
//!   marked `priced: false`, so the estimate never silently invents a price.
//! - **Trend** ([`daily_trend`]): for each UTC day, the latest sample of every series on or
//!   before that day (a day without a sample carries the previous one), priced as above; the
//!   cost of the day is the monthly rate over 30 days (`monthly * 12 / 365` would differ by
//!   1.4%; the 30-day month is what the monthly estimate means).
//! - **Recommendations** ([`recommend`]): what the policy in force keeps and costs per month,
//!   and what alternatives would keep and cost, from the completed backups' manifests. A kept
//!   set costs its *unique stored bytes*: the sealed length of every distinct chunk referenced
//!   by a kept backup, counted once however many kept backups share it (the repository
//!   deduplicates), plus each kept manifest's own size. The guard rails of
//!   [`retention::decide`] (the newest verified backup, the parents of kept backups) apply to
//!   every alternative as they would in a real run. WAL archive bytes are not part of it (their
//!   window is a separate setting).
//!
//! Nothing here records an event or raises an alert: the cost alert rule reads
//! [`monthly_estimate`] against [`CostConfig::budget_usd`].

use std::collections::{BTreeMap, HashMap, HashSet};

use backstop_events::{Envelope, Event};
use backstop_repo::{Hash32, Manifest, Repository};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::method_of;
use crate::error::OpsError;
use crate::forget::{RetentionFacts, TAGS_KEY};
use crate::retention::{Candidate, Class, Policy, RetentionConfig, decide};

/// The storage class a usage sample is recorded under when the configuration names none.
pub const DEFAULT_STORAGE_CLASS: &str = "STANDARD";

/// The default monthly budget (seed 000 R12.3).
pub const DEFAULT_BUDGET_USD: f64 = 15.0;

const GIB: f64 = (1u64 << 30) as f64;

/// The built-in list prices, USD per GB-month, first tier, us-east-1 for AWS: (class, price).
/// Amazon S3: Standard $0.023 (first 50 TB), Standard-IA $0.0125, Glacier Flexible Retrieval
/// $0.0036, from https://aws.amazon.com/s3/pricing/ ("Storage pricing", US East (N. Virginia)).
/// Backblaze B2: $6 per TB-month ($0.006 per GB) pay-as-you-go, from
/// https://www.backblaze.com/cloud-storage/pricing (also stated as of April 2026 in
/// https://leanopstech.com/blog/backblaze-b2-pricing-2026/). The providers price per GB and
/// these are applied per GiB: the table is an estimate, within the 7% of that difference on
/// the safe (higher) side. Other regions and providers go in `[[cost.prices]]`.
pub const DEFAULT_PRICES: &[(&str, f64)] = &[
    ("STANDARD", 0.023),
    ("STANDARD_IA", 0.0125),
    ("GLACIER", 0.0036),
    ("B2", 0.006),
];

/// One `[[cost.prices]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub storage_class: String,
    /// A region name, or `*` / absent for any region.
    #[serde(default)]
    pub region: Option<String>,
    pub usd_per_gib_month: f64,
}

/// The `[cost]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostConfig {
    /// The monthly budget the cost alert compares the estimate with (default 15.0).
    #[serde(default = "default_budget")]
    pub budget_usd: f64,
    /// Prices that override or add to the built-in ones.
    #[serde(default)]
    pub prices: Vec<Price>,
    /// The storage class usage samples are recorded under (default STANDARD).
    #[serde(default)]
    pub storage_class: Option<String>,
}

fn default_budget() -> f64 {
    DEFAULT_BUDGET_USD
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            budget_usd: DEFAULT_BUDGET_USD,
            prices: Vec::new(),
            storage_class: None,
        }
    }
}

/// Why a `[cost]` section was refused; the message names the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CostConfigError {
    #[error("{0}")]
    Invalid(String),
}

impl CostConfig {
    pub fn validate(&self) -> Result<(), CostConfigError> {
        if !self.budget_usd.is_finite() || self.budget_usd < 0.0 {
            return Err(CostConfigError::Invalid(format!(
                "cost.budget_usd must be a non-negative number of dollars, not {}",
                self.budget_usd
            )));
        }
        for (i, p) in self.prices.iter().enumerate() {
            if p.storage_class.trim().is_empty() {
                return Err(CostConfigError::Invalid(format!(
                    "cost.prices[{i}].storage_class must not be empty"
                )));
            }
            if !p.usd_per_gib_month.is_finite() || p.usd_per_gib_month < 0.0 {
                return Err(CostConfigError::Invalid(format!(
                    "cost.prices[{i}].usd_per_gib_month ({}) must be a non-negative number (storage class {})",
                    p.usd_per_gib_month, p.storage_class
                )));
            }
        }
        if self
            .storage_class
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(CostConfigError::Invalid(
                "cost.storage_class must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// The configured prices before the built-in ones.
    pub fn price_table(&self) -> PriceTable {
        PriceTable::new(self.prices.clone())
    }

    pub fn storage_class(&self) -> String {
        self.storage_class
            .as_deref()
            .map(str::to_ascii_uppercase)
            .unwrap_or_else(|| DEFAULT_STORAGE_CLASS.to_string())
    }
}

/// Prices looked up by storage class and region (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PriceTable {
    prices: Vec<Price>,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable::new(Vec::new())
    }
}

impl PriceTable {
    /// `configured` first, then [`DEFAULT_PRICES`] for any region.
    pub fn new(configured: Vec<Price>) -> PriceTable {
        let mut prices = configured;
        prices.extend(DEFAULT_PRICES.iter().map(|(class, usd)| Price {
            storage_class: class.to_string(),
            region: None,
            usd_per_gib_month: *usd,
        }));
        PriceTable { prices }
    }

    /// USD per GiB-month for `class` in `region`: the first exact region match, else the first
    /// any-region match.
    pub fn lookup(&self, class: &str, region: &str) -> Option<f64> {
        let of_class = || {
            self.prices
                .iter()
                .filter(|p| p.storage_class.eq_ignore_ascii_case(class))
        };
        of_class()
            .find(|p| p.region.as_deref() == Some(region))
            .or_else(|| of_class().find(|p| matches!(p.region.as_deref(), None | Some("*"))))
            .map(|p| p.usd_per_gib_month)
    }

    /// USD a month for `bytes` of `class` in `region`; 0 without a price (the alert rules'
    /// per-series figure; [`monthly_estimate`] also says whether a series was priced).
    pub fn monthly_usd(&self, class: &str, region: &str, bytes: u64) -> f64 {
        self.lookup(class, region)
            .map_or(0.0, |usd| monthly_usd(bytes, usd))
    }

    pub fn entries(&self) -> &[Price] {
        &self.prices
    }
}

/// One `storage.usage_sampled`, as the cost figures need it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageSample {
    pub repository: String,
    pub region: String,
    pub storage_class: String,
    pub bytes: u64,
    pub objects: u64,
    pub sampled_at: DateTime<Utc>,
}

impl UsageSample {
    /// The sample an event carries (its `occurred_at` is the sampling time), if it is one.
    pub fn from_envelope(env: &Envelope) -> Option<UsageSample> {
        match env.event() {
            Ok(Event::StorageUsageSampled(e)) => Some(UsageSample {
                repository: e.repository,
                region: e.region,
                storage_class: e.storage_class,
                bytes: e.bytes,
                objects: e.objects,
                sampled_at: env.occurred_at,
            }),
            _ => None,
        }
    }

    fn series(&self) -> (&str, &str, &str) {
        (&self.repository, &self.region, &self.storage_class)
    }
}

/// The cost of one series (repository, region, storage class) at its latest sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesCost {
    pub repository: String,
    pub region: String,
    pub storage_class: String,
    pub bytes: u64,
    pub objects: u64,
    pub sampled_at: DateTime<Utc>,
    pub usd_per_gib_month: f64,
    /// Whether the price table has a price for this class and region (else it counts 0).
    pub priced: bool,
    pub monthly_usd: f64,
    /// Which copy this repository is: `primary` or a replica's name (absent when the
    /// repository is not one the configuration names any more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
}

/// The cost of one region: every copy stored there (R14.5).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RegionCost {
    pub region: String,
    /// The copies in it (`primary`, replica names; a repository's location when unnamed).
    pub copies: Vec<String>,
    pub bytes: u64,
    pub monthly_usd: f64,
    /// False when a series in it has no price (counted as 0).
    pub priced: bool,
}

/// The estimate's series summed per region, regions in name order.
pub fn by_region(estimate: &Estimate) -> Vec<RegionCost> {
    let mut regions: BTreeMap<&str, RegionCost> = BTreeMap::new();
    for s in &estimate.series {
        let r = regions.entry(&s.region).or_insert_with(|| RegionCost {
            region: s.region.clone(),
            copies: Vec::new(),
            bytes: 0,
            monthly_usd: 0.0,
            priced: true,
        });
        let name = s.copy.clone().unwrap_or_else(|| s.repository.clone());
        if !r.copies.contains(&name) {
            r.copies.push(name);
        }
        r.bytes += s.bytes;
        r.monthly_usd += s.monthly_usd;
        r.priced &= s.priced;
    }
    regions.into_values().collect()
}

/// The monthly estimate: the sum of the series' costs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Estimate {
    pub total_usd: f64,
    pub series: Vec<SeriesCost>,
}

/// USD a month for `bytes` at `usd_per_gib_month`.
pub fn monthly_usd(bytes: u64, usd_per_gib_month: f64) -> f64 {
    bytes as f64 / GIB * usd_per_gib_month
}

/// The latest sample of each series.
pub fn latest_samples(samples: &[UsageSample]) -> Vec<&UsageSample> {
    let mut latest: BTreeMap<(&str, &str, &str), &UsageSample> = BTreeMap::new();
    for s in samples {
        let slot = latest.entry(s.series()).or_insert(s);
        if s.sampled_at >= slot.sampled_at {
            *slot = s;
        }
    }
    latest.into_values().collect()
}

/// The monthly estimate from the latest sample of each series in `samples` (older samples are
/// ignored, so the whole history can be passed).
pub fn monthly_estimate(samples: &[UsageSample], prices: &PriceTable) -> Estimate {
    let series: Vec<SeriesCost> = latest_samples(samples)
        .into_iter()
        .map(|s| {
            let price = prices.lookup(&s.storage_class, &s.region);
            let usd = price.unwrap_or(0.0);
            SeriesCost {
                repository: s.repository.clone(),
                region: s.region.clone(),
                storage_class: s.storage_class.clone(),
                bytes: s.bytes,
                objects: s.objects,
                sampled_at: s.sampled_at,
                usd_per_gib_month: usd,
                priced: price.is_some(),
                monthly_usd: monthly_usd(s.bytes, usd),
                copy: None,
            }
        })
        .collect();
    Estimate {
        // A fold from +0.0: an empty float sum is -0.0, which prints as "$-0.00".
        total_usd: series.iter().fold(0.0, |t, s| t + s.monthly_usd),
        series,
    }
}

/// One day of the trend.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DailyCost {
    pub day: NaiveDate,
    pub bytes: u64,
    /// The monthly estimate as of that day.
    pub monthly_usd: f64,
    /// What that day costs: the monthly rate over a 30-day month.
    pub usd: f64,
}

/// The trend over the `days` UTC days ending with `last_day` (inclusive), from the first day
/// with a sample on (see the module documentation).
pub fn daily_trend(
    samples: &[UsageSample],
    prices: &PriceTable,
    last_day: NaiveDate,
    days: u32,
) -> Vec<DailyCost> {
    let mut sorted: Vec<&UsageSample> = samples.iter().collect();
    sorted.sort_by_key(|s| s.sampled_at);
    let first = last_day - TimeDelta::days(i64::from(days.max(1)) - 1);
    let mut current: BTreeMap<(&str, &str, &str), &UsageSample> = BTreeMap::new();
    let mut it = sorted.into_iter().peekable();
    let mut out = Vec::new();
    let mut day = first;
    while day <= last_day {
        while let Some(s) = it.next_if(|s| s.sampled_at.date_naive() <= day) {
            current.insert(s.series(), s);
        }
        if !current.is_empty() {
            let latest: Vec<UsageSample> = current.values().map(|s| (*s).clone()).collect();
            let e = monthly_estimate(&latest, prices);
            out.push(DailyCost {
                day,
                bytes: latest.iter().map(|s| s.bytes).sum(),
                monthly_usd: e.total_usd,
                usd: e.total_usd / 30.0,
            });
        }
        day += TimeDelta::days(1);
    }
    out
}

/// A backup as the recommendations see it: its retention facts and what it stores.
#[derive(Clone, Debug)]
pub struct StoredBackup {
    pub candidate: Candidate,
    /// Every distinct chunk it references, with its sealed length.
    pub chunks: Vec<(Hash32, u64)>,
    /// The manifest object's own size.
    pub manifest_bytes: u64,
}

impl StoredBackup {
    pub fn from_manifest(
        m: &Manifest,
        manifest_bytes: u64,
        facts: &RetentionFacts,
    ) -> StoredBackup {
        let tags = m
            .extra
            .get(TAGS_KEY)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        StoredBackup {
            candidate: Candidate {
                id: m.backup_id,
                source: m.source.clone(),
                kind: m.kind,
                method: method_of(m),
                time: m.finished_at,
                parent: m.parent,
                tags,
                verification: facts.verification(m.backup_id),
            },
            chunks: m
                .distinct_chunks()
                .into_iter()
                .map(|c| (c.id, u64::from(c.sealed_len)))
                .collect(),
            manifest_bytes,
        }
    }
}

/// What one policy keeps and costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyCost {
    /// `current` or the alternative's name.
    pub name: String,
    /// The rules, as [`Policy::describe`] says them.
    pub rules: String,
    pub current: bool,
    pub backups_kept: usize,
    /// Unique stored bytes of the kept set (shared chunks counted once).
    pub stored_bytes: u64,
    pub monthly_usd: f64,
    /// Against the current policy (negative: cheaper).
    pub delta_usd: f64,
}

/// The recommendations: the current policy first, then the alternatives.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Recommendations {
    pub usd_per_gib_month: f64,
    pub backups: usize,
    pub policies: Vec<PolicyCost>,
}

impl Recommendations {
    /// One line per alternative, for people: "keeping 30 dailies ... costs $X a month; 14
    /// dailies and 8 weeklies would cost $Y".
    pub fn summary(&self) -> Vec<String> {
        let Some(cur) = self.policies.iter().find(|p| p.current) else {
            return Vec::new();
        };
        self.policies
            .iter()
            .filter(|p| !p.current)
            .map(|p| {
                format!(
                    "keeping {} ({} backups, {}) costs ${:.2} a month; {} would keep {} backups ({}) and cost ${:.2} ({}{:.2})",
                    cur.rules,
                    cur.backups_kept,
                    human_bytes(cur.stored_bytes),
                    cur.monthly_usd,
                    p.rules,
                    p.backups_kept,
                    human_bytes(p.stored_bytes),
                    p.monthly_usd,
                    if p.delta_usd < 0.0 { "-$" } else { "+$" },
                    p.delta_usd.abs(),
                )
            })
            .collect()
    }
}

/// Bytes for people (GiB, MiB, KiB).
pub fn human_bytes(b: u64) -> String {
    let f = b as f64;
    if f >= GIB {
        format!("{:.2} GiB", f / GIB)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// The built-in alternatives: (name, daily, weekly, monthly), other rules as in the policy in
/// force (tags, zone).
pub const ALTERNATIVES: &[(&str, u32, u32, u32)] = &[
    ("30 dailies", 30, 0, 0),
    ("14 dailies + 8 weeklies", 14, 8, 0),
    ("7 dailies + 4 weeklies + 12 monthlies", 7, 4, 12),
];

/// The alternative policies to `current`, built from [`ALTERNATIVES`].
pub fn alternatives(current: &Policy) -> Vec<(String, Policy)> {
    ALTERNATIVES
        .iter()
        .map(|(name, d, w, m)| {
            let mut p = Policy::none(name.to_string());
            p.keep_daily = *d;
            p.keep_weekly = *w;
            p.keep_monthly = *m;
            p.keep_tags = current.keep_tags.clone();
            p.zone = current.zone;
            (name.to_string(), p)
        })
        .collect()
}

/// Unique stored bytes of the backups in `kept`.
pub fn unique_bytes<'a>(kept: impl IntoIterator<Item = &'a StoredBackup>) -> u64 {
    let mut seen: HashSet<Hash32> = HashSet::new();
    let mut total = 0u64;
    for b in kept {
        total += b.manifest_bytes;
        for (id, len) in &b.chunks {
            if seen.insert(*id) {
                total += len;
            }
        }
    }
    total
}

/// What `retention`'s policies keep of `backups` at `now` and what the alternatives would keep,
/// each costed at `usd_per_gib_month` (see the module documentation). Each source is decided
/// under its own policy; chunks shared across sources are counted once.
pub fn recommend(
    backups: &[StoredBackup],
    retention: &RetentionConfig,
    usd_per_gib_month: f64,
    now: DateTime<Utc>,
) -> Recommendations {
    let mut by_source: BTreeMap<&str, Vec<&StoredBackup>> = BTreeMap::new();
    for b in backups {
        by_source.entry(&b.candidate.source).or_default().push(b);
    }
    // The policy set to evaluate: the current one per source, then each alternative applied to
    // every source.
    let mut sets: Vec<(String, String, bool, HashMap<&str, Policy>)> = Vec::new();
    let current: HashMap<&str, Policy> = by_source
        .keys()
        .map(|s| (*s, retention.policy(s, Class::Backups)))
        .collect();
    let rules = describe_set(&current);
    for (i, (name, ..)) in ALTERNATIVES.iter().enumerate() {
        let set: HashMap<&str, Policy> = current
            .iter()
            .map(|(s, p)| (*s, alternatives(p).swap_remove(i).1))
            .collect();
        sets.push((name.to_string(), name.to_string(), false, set));
    }
    sets.insert(0, ("current".into(), rules, true, current));

    let mut policies = Vec::new();
    for (name, rules, is_current, set) in sets {
        let mut kept: Vec<&StoredBackup> = Vec::new();
        for (source, list) in &by_source {
            let Some(policy) = set.get(source) else {
                continue;
            };
            let candidates: Vec<Candidate> = list.iter().map(|b| b.candidate.clone()).collect();
            let keep: HashSet<uuid::Uuid> = decide(&candidates, policy, now)
                .into_iter()
                .filter(|d| d.keep)
                .map(|d| d.id)
                .collect();
            kept.extend(list.iter().filter(|b| keep.contains(&b.candidate.id)));
        }
        let stored = unique_bytes(kept.iter().copied());
        policies.push(PolicyCost {
            name,
            rules,
            current: is_current,
            backups_kept: kept.len(),
            stored_bytes: stored,
            monthly_usd: monthly_usd(stored, usd_per_gib_month),
            delta_usd: 0.0,
        });
    }
    let base = policies.first().map_or(0.0, |p| p.monthly_usd);
    for p in &mut policies {
        p.delta_usd = p.monthly_usd - base;
    }
    Recommendations {
        usd_per_gib_month,
        backups: backups.len(),
        policies,
    }
}

fn describe_set(set: &HashMap<&str, Policy>) -> String {
    let mut rules: Vec<String> = set.values().map(Policy::describe).collect();
    rules.sort();
    rules.dedup();
    if rules.is_empty() {
        "the current policy".into()
    } else {
        rules.join("; ")
    }
}

/// Reads every readable backup of `repo` for [`recommend`]. Unreadable manifests are skipped
/// and counted in the second value (a recommendation is an estimate; forget itself refuses to
/// run over them).
pub async fn stored_backups(
    repo: &Repository,
    facts: &RetentionFacts,
) -> Result<(Vec<StoredBackup>, usize), OpsError> {
    let mut out = Vec::new();
    let mut unreadable = 0;
    for listed in repo.list_backups().await? {
        match listed.manifest {
            Ok(m) => out.push(StoredBackup::from_manifest(&m, listed.manifest_size, facts)),
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(_) => unreadable += 1,
        }
    }
    Ok((out, unreadable))
}

/// The days of the dashboard's and `backstop cost`'s trend.
pub const TREND_DAYS: u32 = 90;

/// Everything `backstop cost`, `/cost` and `/api/cost` show.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostReport {
    pub budget_usd: f64,
    pub estimate: Estimate,
    pub over_budget: bool,
    /// The last [`TREND_DAYS`] days, from the first with a sample.
    pub trend: Vec<DailyCost>,
    /// The estimate per region: the primary and each replica where they are stored.
    pub regions: Vec<RegionCost>,
    pub recommendations: Option<Recommendations>,
    /// What a reader should know about the figures (no sample yet, unreadable backups).
    pub notes: Vec<String>,
}

impl CostReport {
    /// Names each series' copy from `names` (repository location -> `primary` or a replica's
    /// name) and sums the regions again with those names.
    pub fn name_copies(&mut self, names: &BTreeMap<String, String>) {
        for s in &mut self.estimate.series {
            s.copy = names.get(&s.repository).cloned();
        }
        self.regions = by_region(&self.estimate);
    }
}

/// The report from the usage samples and, when the backups could be read, the recommendations.
pub fn report(
    samples: &[UsageSample],
    config: &CostConfig,
    recommendations: Option<Recommendations>,
    today: NaiveDate,
) -> CostReport {
    let prices = config.price_table();
    let estimate = monthly_estimate(samples, &prices);
    let mut notes = Vec::new();
    if samples.is_empty() {
        notes.push(
            "no storage usage sampled yet: serve samples it once a day (storage.usage_sampled)"
                .to_string(),
        );
    }
    for s in estimate.series.iter().filter(|s| !s.priced) {
        notes.push(format!(
            "no price for storage class {} in {}: counted as $0 (add a [[cost.prices]] entry)",
            s.storage_class, s.region
        ));
    }
    CostReport {
        budget_usd: config.budget_usd,
        over_budget: estimate.total_usd > config.budget_usd,
        trend: daily_trend(samples, &prices, today, TREND_DAYS),
        regions: by_region(&estimate),
        estimate,
        recommendations,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn sample(repo: &str, region: &str, class: &str, bytes: u64, day: u32) -> UsageSample {
        UsageSample {
            repository: repo.into(),
            region: region.into(),
            storage_class: class.into(),
            bytes,
            objects: 10,
            sampled_at: Utc.with_ymd_and_hms(2026, 3, day, 3, 0, 0).unwrap(),
        }
    }

    #[test]
    fn the_estimate_matches_a_hand_computation_from_the_price_table() {
        let gib = 1u64 << 30;
        let table = CostConfig {
            prices: vec![Price {
                storage_class: "STANDARD".into(),
                region: Some("eu-west-1".into()),
                usd_per_gib_month: 0.024,
            }],
            ..CostConfig::default()
        }
        .price_table();
        let samples = vec![
            // Superseded by the day-2 sample of the same series.
            sample("s3://a", "us-east-1", "STANDARD", 500 * gib, 1),
            sample("s3://a", "us-east-1", "STANDARD", 100 * gib, 2),
            sample("s3://b", "eu-west-1", "standard", 50 * gib, 2),
            sample("s3://c", "us-east-1", "GLACIER", 1000 * gib, 2),
            sample("s3://d", "us-east-1", "B2", 200 * gib, 2),
            sample("s3://e", "us-east-1", "STANDARD_IA", 40 * gib, 2),
            sample("s3://f", "mars-1", "TAPE", 7 * gib, 2),
        ];
        let e = monthly_estimate(&samples, &table);
        // 100 GiB * 0.023 = 2.30 (S3 Standard, any region)
        // 50 GiB * 0.024  = 1.20 (the configured eu-west-1 price wins over the default)
        // 1000 GiB * 0.0036 = 3.60 (Glacier Flexible Retrieval)
        // 200 GiB * 0.006 = 1.20 (Backblaze B2)
        // 40 GiB * 0.0125 = 0.50 (S3 Standard-IA)
        // TAPE has no price: 0, marked unpriced
        // total = 2.30 + 1.20 + 3.60 + 1.20 + 0.50 = 8.80
        assert_eq!(e.series.len(), 6);
        assert!((e.total_usd - 8.80).abs() < 1e-9, "{}", e.total_usd);
        let a = e.series.iter().find(|s| s.repository == "s3://a").unwrap();
        assert_eq!(a.bytes, 100 * gib);
        assert!((a.monthly_usd - 2.30).abs() < 1e-9);
        let b = e.series.iter().find(|s| s.repository == "s3://b").unwrap();
        assert!((b.monthly_usd - 1.20).abs() < 1e-9);
        let f = e.series.iter().find(|s| s.repository == "s3://f").unwrap();
        assert!(!f.priced && f.monthly_usd == 0.0);
    }

    #[test]
    fn the_cost_is_reported_per_region_with_each_copys_own_price() {
        let gib = 1u64 << 30;
        let config = CostConfig {
            prices: vec![Price {
                storage_class: "STANDARD".into(),
                region: Some("eu-central-1".into()),
                usd_per_gib_month: 0.0245,
            }],
            ..CostConfig::default()
        };
        let samples = vec![
            sample("s3://main/bk", "us-east-1", "STANDARD", 200 * gib, 2),
            sample("s3://eu/bk", "eu-central-1", "STANDARD", 200 * gib, 2),
            sample("s3://cold/bk", "eu-central-1", "GLACIER", 300 * gib, 2),
            sample("s3://gone/bk", "ap-south-1", "TAPE", gib, 2),
        ];
        let mut r = report(
            &samples,
            &config,
            None,
            NaiveDate::from_ymd_opt(2026, 3, 2).unwrap(),
        );
        let names = BTreeMap::from([
            ("s3://main/bk".to_string(), "primary".to_string()),
            ("s3://eu/bk".to_string(), "eu".to_string()),
            ("s3://cold/bk".to_string(), "vault".to_string()),
        ]);
        r.name_copies(&names);
        // us-east-1: 200 GiB * 0.023 = 4.60 (the primary)
        // eu-central-1: 200 GiB * 0.0245 = 4.90 (eu, the region's configured price)
        //             + 300 GiB * 0.0036 = 1.08 (vault, Glacier) = 5.98
        // ap-south-1: no price for TAPE: 0, unpriced, named by its location
        let region = |n: &str| r.regions.iter().find(|x| x.region == n).unwrap();
        assert_eq!(r.regions.len(), 3);
        assert!((region("us-east-1").monthly_usd - 4.60).abs() < 1e-9);
        assert_eq!(region("us-east-1").copies, ["primary"]);
        let eu = region("eu-central-1");
        assert!((eu.monthly_usd - 5.98).abs() < 1e-9, "{}", eu.monthly_usd);
        assert_eq!(eu.copies, ["vault", "eu"]);
        assert_eq!(eu.bytes, 500 * gib);
        assert!(eu.priced);
        let ap = region("ap-south-1");
        assert!(!ap.priced && ap.copies == ["s3://gone/bk"]);
        let total: f64 = r.regions.iter().map(|x| x.monthly_usd).sum();
        assert!((total - r.estimate.total_usd).abs() < 1e-9);
        let eu_series = r
            .estimate
            .series
            .iter()
            .find(|s| s.copy.as_deref() == Some("eu"))
            .unwrap();
        assert_eq!(eu_series.usd_per_gib_month, 0.0245);
    }

    #[test]
    fn the_trend_carries_the_last_sample_over_days_without_one() {
        let gib = 1u64 << 30;
        let table = PriceTable::default();
        let samples = vec![
            sample("s3://a", "us-east-1", "STANDARD", 300 * gib, 2),
            sample("s3://a", "us-east-1", "STANDARD", 600 * gib, 4),
        ];
        let last = NaiveDate::from_ymd_opt(2026, 3, 5).unwrap();
        let t = daily_trend(&samples, &table, last, 90);
        // Days before the first sample are left out: 2, 3 (carried), 4, 5 (carried).
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].day, NaiveDate::from_ymd_opt(2026, 3, 2).unwrap());
        // 300 GiB * 0.023 = 6.90 a month, 0.23 a day; 600 GiB: 13.80 a month, 0.46 a day.
        assert!((t[1].monthly_usd - 6.90).abs() < 1e-9);
        assert!((t[1].usd - 0.23).abs() < 1e-9);
        assert!((t[3].monthly_usd - 13.80).abs() < 1e-9);
        assert!((t[3].usd - 0.46).abs() < 1e-9);
    }

    #[test]
    fn bad_prices_and_budgets_name_the_key() {
        let c = CostConfig {
            prices: vec![Price {
                storage_class: "STANDARD".into(),
                region: None,
                usd_per_gib_month: -1.0,
            }],
            ..CostConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cost.prices[0].usd_per_gib_month"), "{e}");
        let c = CostConfig {
            budget_usd: -3.0,
            ..CostConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("cost.budget_usd")
        );
    }
}
