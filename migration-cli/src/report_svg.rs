//! A [`MigrationReport`] as an SVG picture (`vmsnap demo --report FILE.svg`): one
//! column per round, in three panels — bytes put on the wire; the dirty rate next to
//! the link bandwidth; the auto-converge throttle — and the downtime by phase below.
//!
//! Rendered with plotters' SVG backend only (text as `<text>` elements, laid out
//! without font files), in the CLI rather than in migration-core, which stays free of
//! drawing dependencies.

use std::time::Duration;

use anyhow::{anyhow, Result};
use migration_core::MigrationReport;
use plotters::prelude::*;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 820;
const MIB: f64 = 1024.0 * 1024.0;

const WIRE: RGBColor = RGBColor(70, 110, 180);
const DIRTY: RGBColor = RGBColor(200, 60, 50);
const LINK: RGBColor = RGBColor(40, 140, 80);
const THROTTLE: RGBColor = RGBColor(150, 90, 170);

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the report: {e}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Renders `report` as an SVG document.
pub fn render(report: &MigrationReport) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let d = &report.downtime;
        let title = format!(
            "migration: {} rounds, {:.1} MiB sent in {:.0} ms, {}converged, downtime {:.1} ms",
            report.rounds.len(),
            report.bytes_sent as f64 / MIB,
            ms(report.total_time),
            if report.converged { "" } else { "not " },
            ms(d.total)
        );
        let root = root.titled(&title, ("sans-serif", 20)).map_err(err)?;
        let (panels, bottom) = root.split_vertically(HEIGHT - 150);
        let rows = panels.split_evenly((3, 1));
        let n = report.rounds.len().max(1) as u32;
        let xs = 0u32..n;
        let last_label = |r: &u32| -> String {
            if *r + 1 == n {
                format!("{r} (paused)")
            } else {
                r.to_string()
            }
        };

        // Bytes on the wire per round.
        let top = report
            .rounds
            .iter()
            .map(|r| r.wire_bytes as f64 / MIB)
            .fold(0.0f64, f64::max)
            .max(0.001)
            * 1.15;
        let mut chart = ChartBuilder::on(&rows[0])
            .caption("bytes on the wire per round (MiB)", ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(60)
            .build_cartesian_2d(xs.clone().into_segmented(), 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(r) => last_label(r),
                _ => String::new(),
            })
            .draw()
            .map_err(err)?;
        chart
            .draw_series(report.rounds.iter().enumerate().map(|(i, r)| {
                let i = i as u32;
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), r.wire_bytes as f64 / MIB),
                    ],
                    WIRE.mix(0.8).filled(),
                );
                bar.set_margin(0, 0, 6, 6);
                bar
            }))
            .map_err(err)?;

        // Dirty rate and bandwidth per round.
        let top = report
            .rounds
            .iter()
            .flat_map(|r| [r.dirty_rate, r.bandwidth])
            .fold(0.0f64, f64::max)
            .max(1.0)
            / 1e6
            * 1.15;
        let mut chart = ChartBuilder::on(&rows[1])
            .caption("dirty rate and link bandwidth (MB/s)", ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n as usize)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(err)?;
        let points = |f: fn(&migration_core::precopy::RoundReport) -> f64| {
            report
                .rounds
                .iter()
                .enumerate()
                .map(move |(i, r)| (i as f64, f(r) / 1e6))
                .collect::<Vec<_>>()
        };
        for (data, color, label) in [
            (points(|r| r.dirty_rate), DIRTY, "dirty rate"),
            (points(|r| r.bandwidth), LINK, "link bandwidth"),
        ] {
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(data.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;

        // Throttle per round.
        let mut chart = ChartBuilder::on(&rows[2])
            .caption(
                "auto-converge throttle (% of each time slice asleep)",
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0..100.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n as usize)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(err)?;
        let throttle: Vec<(f64, f64)> = report
            .rounds
            .iter()
            .enumerate()
            .map(|(i, r)| (i as f64, f64::from(r.throttle)))
            .collect();
        chart
            .draw_series(LineSeries::new(throttle.clone(), THROTTLE.stroke_width(2)))
            .map_err(err)?;
        chart
            .draw_series(
                throttle
                    .into_iter()
                    .map(|p| Circle::new(p, 3, THROTTLE.filled())),
            )
            .map_err(err)?;

        // Downtime by phase: one stacked bar.
        let phases = [
            ("final round", d.final_round, RGBColor(230, 150, 60)),
            ("state capture", d.state_capture, RGBColor(90, 160, 200)),
            ("state send", d.state_send, RGBColor(120, 190, 120)),
            ("resume", d.resume, RGBColor(190, 120, 160)),
        ];
        let total = ms(d.total)
            .max(phases.iter().map(|p| ms(p.1)).sum::<f64>())
            .max(0.001);
        let mut chart = ChartBuilder::on(&bottom)
            .caption(
                format!("downtime {:.2} ms by phase (ms)", ms(d.total)),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..total * 1.02, 0.0..1.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .draw()
            .map_err(err)?;
        let mut at = 0.0;
        for (label, t, color) in phases {
            let end = at + ms(t);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(at, 0.2), (end, 0.8)],
                    color.filled(),
                )))
                .map_err(err)?
                .label(format!("{label} {:.2}", ms(t)))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            at = end;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_core::codec::CodecId;
    use migration_core::precopy::{Downtime, RoundReport};

    fn report() -> MigrationReport {
        let round = |round, wire_bytes: u64, dirty_rate, throttle| RoundReport {
            round,
            guest_bytes: wire_bytes,
            pages: wire_bytes / 4096,
            wire_bytes,
            duration: Duration::from_millis(100),
            dirty_bytes: wire_bytes / 2,
            dirty_rate,
            bandwidth: 130e6,
            throttle,
            ..RoundReport::default()
        };
        MigrationReport {
            features: 0,
            rounds: vec![
                round(0, 64 << 20, 260e6, 0),
                round(1, 24 << 20, 250e6, 0),
                round(2, 24 << 20, 200e6, 20),
                round(3, 2 << 20, 0.0, 30),
            ],
            bytes_sent: 114 << 20,
            bandwidth: 130e6,
            total_time: Duration::from_millis(900),
            downtime: Downtime {
                final_round: Duration::from_millis(15),
                state_capture: Duration::from_millis(1),
                state_send: Duration::from_millis(2),
                resume: Duration::from_millis(1),
                total: Duration::from_millis(19),
            },
            converged: true,
            protocol_version: 2,
            codec: CodecId(*b"pcd1"),
        }
    }

    #[test]
    fn the_svg_shows_every_panel_with_text_and_no_font_files() {
        let svg = render(&report()).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for text in [
            "bytes on the wire per round (MiB)",
            "dirty rate and link bandwidth (MB/s)",
            "auto-converge throttle",
            "downtime 19.00 ms by phase",
            "final round 15.00",
            "3 (paused)",
            "4 rounds",
        ] {
            assert!(svg.contains(text), "no `{text}` in the SVG");
        }
        assert!(svg.contains("<text"), "text is drawn as <text> elements");
    }
}
