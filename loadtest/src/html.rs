//! A self-contained HTML report: tables and charts drawn as inline SVG (no scripts, no
//! CDN), readable offline.

use crate::report::Report;

const COLORS: [&str; 6] = [
    "#2f6fde", "#d9480f", "#2b8a3e", "#9c36b5", "#e67700", "#495057",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart of `series` (name, points).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) -> String {
    let (w, h, ml, mr, mt, mb) = (560.0, 300.0, 64.0, 16.0, 28.0, 44.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return format!("<p>{}: no data</p>", esc(title));
    }
    let fx = |x: f64| if log_x { x.max(1e-9).log2() } else { x };
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(fx(p.0)), b.max(fx(p.0)))
    });
    let y1 = pts.iter().fold(0f64, |a, p| a.max(p.1)) * 1.08;
    let (x1, y1) = (
        if x1 > x0 { x1 } else { x0 + 1.0 },
        if y1 > 0.0 { y1 } else { 1.0 },
    );
    let sx = |x: f64| ml + (fx(x) - x0) / (x1 - x0) * (w - ml - mr);
    let sy = |y: f64| h - mb - y / y1 * (h - mt - mb);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><text x="{ml}" y="16" font-size="13" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for i in 0..=4 {
        let y = y1 * i as f64 / 4.0;
        let (yy, label) = (sy(y), fmt(y));
        let (x2, tx) = (w - mr, ml - 6.0);
        svg += &format!(
            r##"<line x1="{ml}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e5e7eb"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{label}</text>"##,
            ty = yy + 4.0
        );
    }
    let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let step = (xs.len() / 8).max(1);
    for x in xs.iter().step_by(step) {
        svg += &format!(
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            sx(*x),
            h - mb + 16.0,
            fmt(*x)
        );
    }
    svg += &format!(
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(14 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (ml + w - mr) / 2.0,
        h - 8.0,
        esc(x_label),
        (mt + h - mb) / 2.0,
        esc(y_label)
    );
    for (i, (name, p)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = p
            .iter()
            .filter(|q| q.0.is_finite() && q.1.is_finite())
            .map(|q| format!("{:.1},{:.1}", sx(q.0), sy(q.1)))
            .collect();
        svg += &format!(
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        if p.len() <= 12 {
            for q in p {
                svg += &format!(
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                    sx(q.0),
                    sy(q.1)
                );
            }
        }
        svg += &format!(
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            w - mr - 170.0,
            mt + 4.0 + 16.0 * i as f64,
            w - mr - 155.0,
            mt + 13.0 + 16.0 * i as f64,
            esc(name)
        );
    }
    svg + "</svg>"
}

fn fmt(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn table(runs: &[(String, &Report)]) -> String {
    let mut t = String::from("<table><tr><th>server</th><th>load</th><th>ok / requests</th><th>errors</th><th>output tok/s</th><th>req/s</th><th>TTFT p50 / p99 ms</th><th>ITL p50 / p99 ms</th><th>TPOT mean ms</th><th>E2E p50 ms</th><th>goodput req/s</th></tr>");
    for (name, r) in runs {
        let load = match (r.concurrency, r.request_rate) {
            (Some(c), _) => format!("{c} streams"),
            (_, Some(x)) => format!("{x} req/s"),
            _ => String::new(),
        };
        t += &format!(
            "<tr><td>{}</td><td>{load}</td><td>{} / {}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.0} / {:.0}</td><td>{:.1} / {:.1}</td><td>{:.1}</td><td>{:.0}</td><td>{}</td></tr>",
            esc(name), r.completed, r.requests, esc(&format!("{:?}", r.errors)), r.output_tokens_per_s, r.requests_per_s,
            r.ttft_ms.p50, r.ttft_ms.p99, r.itl_ms.p50, r.itl_ms.p99, r.tpot_ms.mean, r.e2e_ms.p50,
            r.goodput_requests_per_s.map_or("-".into(), |g| format!("{g:.2}")),
        );
    }
    t + "</table>"
}

/// For runs at several concurrencies: throughput, TTFT p50 and ITL p50 against
/// concurrency, one line per server, as (file name, SVG).
pub fn sweep_charts(groups: &[(String, Vec<Report>)]) -> Vec<(&'static str, String)> {
    if !groups.iter().any(|(_, rs)| rs.len() > 1) {
        return Vec::new();
    }
    // (file, title, unit, value)
    type Metric = (&'static str, &'static str, &'static str, fn(&Report) -> f64);
    let metrics: [Metric; 3] = [
        ("throughput.svg", "Output throughput", "tokens/s", |r| {
            r.output_tokens_per_s
        }),
        ("ttft.svg", "TTFT p50", "ms", |r| r.ttft_ms.p50),
        ("itl.svg", "ITL p50", "ms", |r| r.itl_ms.p50),
    ];
    metrics
        .iter()
        .map(|(file, title, y, f)| {
            let series: Vec<(String, Vec<(f64, f64)>)> = groups
                .iter()
                .map(|(n, rs)| {
                    let pts = rs
                        .iter()
                        .filter_map(|r| r.concurrency.map(|c| (c as f64, f(r))))
                        .collect();
                    (n.clone(), pts)
                })
                .collect();
            (
                *file,
                line_chart(title, "concurrent streams (log scale)", y, &series, true),
            )
        })
        .collect()
}

/// The report page for `groups`: each a server name and its runs (one per load level).
pub fn render(title: &str, groups: &[(String, Vec<Report>)]) -> String {
    let mut body = format!("<h1>{}</h1>", esc(title));
    let flat: Vec<(String, &Report)> = groups
        .iter()
        .flat_map(|(n, rs)| rs.iter().map(move |r| (n.clone(), r)))
        .collect();
    body += &table(&flat);
    let charts = sweep_charts(groups);
    if !charts.is_empty() {
        body += "<h2>Against concurrency</h2><div class=charts>";
        for (_, svg) in charts {
            body += &svg;
        }
        body += "</div>";
    }
    for (name, r) in &flat {
        let load = r.concurrency.map_or_else(
            || format!("{} req/s", r.request_rate.unwrap_or(0.0)),
            |c| format!("{c} streams"),
        );
        body += &format!("<h2>{} — {load}</h2><div class=charts>", esc(name));
        for (metric, label) in [
            ("ttft", "TTFT"),
            ("itl", "inter-token latency"),
            ("e2e", "end-to-end latency"),
        ] {
            let cdf = r.cdf_ms.get(metric).cloned().unwrap_or_default();
            let pts: Vec<(f64, f64)> = cdf
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64 * 2.0, *v))
                .collect();
            body += &line_chart(
                &format!("{label} distribution"),
                "percentile",
                "ms",
                &[(label.to_string(), pts)],
                false,
            );
        }
        let tl: Vec<(f64, f64)> = r
            .output_tokens_per_s_timeline
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64, *v))
            .collect();
        body += &line_chart(
            "Throughput over time",
            "seconds",
            "output tokens/s",
            &[("output".into(), tl)],
            false,
        );
        body += "</div>";
    }
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>{}</title><style>body{{font-family:sans-serif;margin:2rem;color:#1d2330}}table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #dde1e8;padding:.3rem .6rem;text-align:right}}th{{background:#f6f7f9}}.charts{{display:flex;flex-wrap:wrap;gap:1rem}}</style></head><body>{body}</body></html>",
        esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_inline_svg_with_every_series() {
        let svg = line_chart(
            "t",
            "x",
            "y",
            &[
                ("a<b".into(), vec![(1.0, 2.0), (4.0, 8.0)]),
                ("c".into(), vec![(2.0, 1.0)]),
            ],
            true,
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a&lt;b"));
        assert!(!svg.contains("NaN"));
        assert!(line_chart("t", "x", "y", &[], false).contains("no data"));
    }
}
