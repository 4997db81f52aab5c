//! Charts as inline SVG, rendered on the server: no script, no external asset, nothing to fetch
//! (the dashboards run on closed networks). Every mark carries a `<title>` (the browser shows it
//! on hover) and `data-*` attributes, so tests and people read the same figures.

use backstop_projections::read::{SizePoint, StoragePoint, VerificationDay};
use chrono::{DateTime, Duration, Utc};

use crate::error::escape;

const W: f64 = 720.0;
const H: f64 = 220.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 30.0;

/// Bytes for people: `1.5 GiB`.
pub fn bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{} B", n as i64)
    } else if v >= 100.0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A duration for people: `2 h 05 min`, `42 s`, `350 ms`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms} ms");
    }
    let s = ms / 1000;
    if s < 60 {
        return format!("{:.1} s", ms as f64 / 1000.0);
    }
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        if h >= 48 {
            return format!("{} d {} h", h / 24, h % 24);
        }
        format!("{h} h {m:02} min")
    } else {
        format!("{m} min {s:02} s")
    }
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let exp = v.log10().floor();
    let base = 10f64.powf(exp);
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * base {
            return m * base;
        }
    }
    10.0 * base
}

fn frame(title: &str, class: &str, ymax: f64, y_label: impl Fn(f64) -> String) -> String {
    let mut s = format!(
        "<svg class=\"chart {class}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{t}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title>{t}</title>",
        t = escape(title)
    );
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let y = TOP + (H - TOP - BOTTOM) * (1.0 - i as f64 / 4.0);
        s.push_str(&format!(
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"ylabel\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            escape(&y_label(v))
        ));
    }
    s
}

fn empty(title: &str, class: &str, note: &str) -> String {
    format!(
        "<svg class=\"chart {class} empty\" viewBox=\"0 0 {W} 60\" role=\"img\" aria-label=\"{t}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title>{t}</title>\
         <text x=\"{}\" y=\"34\" text-anchor=\"middle\" class=\"note\">{}</text></svg>",
        W / 2.0,
        escape(note),
        t = escape(title)
    )
}

/// Grouped bars per backup: raw, stored and new bytes.
pub fn sizes(points: &[SizePoint]) -> String {
    let title = "Backup sizes: raw, stored, new";
    if points.is_empty() {
        return empty(title, "sizes", "No completed backup yet");
    }
    let ymax = nice_max(
        points
            .iter()
            .map(|p| p.raw_bytes.max(p.stored_bytes))
            .max()
            .unwrap_or(0) as f64,
    );
    let mut s = frame(title, "sizes", ymax, |v| bytes(v as i64));
    let plot_w = W - LEFT - RIGHT;
    let slot = plot_w / points.len() as f64;
    let bar = (slot * 0.8 / 3.0).min(18.0);
    let plot_h = H - TOP - BOTTOM;
    let label_every = (points.len() / 8).max(1);
    for (i, p) in points.iter().enumerate() {
        let x0 = LEFT + slot * i as f64 + (slot - bar * 3.0) / 2.0;
        for (j, (kind, v)) in [
            ("raw", p.raw_bytes),
            ("stored", p.stored_bytes),
            ("new", p.new_bytes),
        ]
        .into_iter()
        .enumerate()
        {
            let h = plot_h * (v.max(0) as f64 / ymax);
            s.push_str(&format!(
                "<rect class=\"bar {kind}\" data-backup=\"{id}\" data-bytes=\"{v}\" x=\"{:.1}\" y=\"{:.1}\" \
                 width=\"{bar:.1}\" height=\"{h:.1}\"><title>{src} {at}: {kind} {b}</title></rect>",
                x0 + bar * j as f64,
                TOP + plot_h - h,
                id = p.backup_id,
                src = escape(&p.source),
                at = p.completed_at.format("%Y-%m-%d %H:%M"),
                b = bytes(v),
            ));
        }
        if i % label_every == 0 {
            s.push_str(&format!(
                "<text class=\"xlabel\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                LEFT + slot * (i as f64 + 0.5),
                H - 10.0,
                p.completed_at.format("%m-%d")
            ));
        }
    }
    s.push_str(&legend(&[
        ("raw", "raw"),
        ("stored", "stored"),
        ("new", "new"),
    ]));
    s.push_str("</svg>");
    s
}

fn legend(items: &[(&str, &str)]) -> String {
    let mut s = String::new();
    let mut x = W - RIGHT - 80.0 * items.len() as f64;
    for (class, label) in items {
        s.push_str(&format!(
            "<rect class=\"legend {class}\" x=\"{x:.1}\" y=\"2\" width=\"10\" height=\"10\"/>\
             <text class=\"legendlabel\" x=\"{:.1}\" y=\"11\">{label}</text>",
            x + 14.0
        ));
        x += 80.0;
    }
    s
}

/// Storage used over time, as an area under a line.
pub fn storage(points: &[StoragePoint], since: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let title = "Storage used over time";
    if points.is_empty() {
        return empty(title, "storage", "No storage usage sampled yet");
    }
    let ymax = nice_max(points.iter().map(|p| p.bytes).max().unwrap_or(0) as f64);
    let mut s = frame(title, "storage", ymax, |v| bytes(v as i64));
    let span = (now - since).num_seconds().max(1) as f64;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let xy = |p: &StoragePoint| {
        let x = LEFT + plot_w * ((p.at - since).num_seconds().max(0) as f64 / span).min(1.0);
        let y = TOP + plot_h * (1.0 - p.bytes.max(0) as f64 / ymax);
        (x, y)
    };
    let mut line = String::new();
    for (i, p) in points.iter().enumerate() {
        let (x, y) = xy(p);
        line.push_str(&format!("{}{x:.1},{y:.1}", if i == 0 { "M" } else { " L" }));
    }
    let (x_first, _) = xy(&points[0]);
    let (x_last, _) = xy(&points[points.len() - 1]);
    let base = TOP + plot_h;
    s.push_str(&format!(
        "<path class=\"area\" d=\"{line} L{x_last:.1},{base:.1} L{x_first:.1},{base:.1} Z\"/>\
         <path class=\"line\" d=\"{line}\"/>"
    ));
    for p in points {
        let (x, y) = xy(p);
        s.push_str(&format!(
            "<circle class=\"point\" data-bytes=\"{}\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\">\
             <title>{}: {} in {} objects</title></circle>",
            p.bytes,
            p.at.format("%Y-%m-%d %H:%M"),
            bytes(p.bytes),
            p.objects
        ));
    }
    let ticks = 6;
    for i in 0..=ticks {
        let t = since + Duration::seconds((span * i as f64 / ticks as f64) as i64);
        s.push_str(&format!(
            "<text class=\"xlabel\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            LEFT + plot_w * i as f64 / ticks as f64,
            H - 10.0,
            t.format("%m-%d")
        ));
    }
    s.push_str("</svg>");
    s
}

/// One cell per day for the last `days` days: green when every verification passed, red when
/// any failed, grey when none ran.
pub fn verification_strip(days: &[VerificationDay], today: DateTime<Utc>, n: i64) -> String {
    let cell = 96.0;
    let w = cell * n as f64;
    let mut s = format!(
        "<svg class=\"chart verifications\" viewBox=\"0 0 {w} 64\" role=\"img\" \
         aria-label=\"Verifications, last {n} days\" xmlns=\"http://www.w3.org/2000/svg\">\
         <title>Verifications, last {n} days</title>"
    );
    for i in 0..n {
        let day = (today - Duration::days(n - 1 - i)).date_naive();
        let d = days.iter().find(|d| d.day == day);
        let (passed, failed) = d.map(|d| (d.passed, d.failed)).unwrap_or((0, 0));
        let class = if failed > 0 {
            "failed"
        } else if passed > 0 {
            "passed"
        } else {
            "none"
        };
        let x = cell * i as f64;
        s.push_str(&format!(
            "<g class=\"day {class}\" data-day=\"{day}\" data-passed=\"{passed}\" data-failed=\"{failed}\">\
             <rect x=\"{:.1}\" y=\"2\" width=\"{:.1}\" height=\"40\" rx=\"4\"/>\
             <text x=\"{:.1}\" y=\"27\" text-anchor=\"middle\">{}</text>\
             <text class=\"xlabel\" x=\"{:.1}\" y=\"58\" text-anchor=\"middle\">{}</text>\
             <title>{day}: {passed} passed, {failed} failed</title></g>",
            x + 3.0,
            cell - 6.0,
            x + cell / 2.0,
            if passed + failed == 0 {
                "–".to_string()
            } else if failed > 0 {
                format!("✗ {failed}  ✓ {passed}")
            } else {
                format!("✓ {passed}")
            },
            x + cell / 2.0,
            day.format("%a %d")
        ));
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(duration_ms(350), "350 ms");
        assert_eq!(duration_ms(42_000), "42.0 s");
        assert_eq!(duration_ms(3_900_000), "1 h 05 min");
    }

    #[test]
    fn bars_carry_their_figures() {
        let p = SizePoint {
            backup_id: uuid::Uuid::nil(),
            source: "<x>".into(),
            kind: "full".into(),
            completed_at: Utc::now(),
            raw_bytes: 100,
            stored_bytes: 50,
            new_bytes: 10,
        };
        let svg = sizes(&[p]);
        assert_eq!(svg.matches("<rect class=\"bar ").count(), 3);
        assert!(svg.contains("data-bytes=\"50\""));
        assert!(svg.contains("&lt;x&gt;"), "labels are escaped");
    }
}
