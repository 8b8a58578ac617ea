//! `loss.svg`: training loss (and eval loss) against the step, as a plain
//! SVG polyline chart. Hand-written rather than through `plotters`: one
//! chart with two lines does not justify a new dependency tree in the build.

/// An SVG chart of `train` and `eval` (step, loss) points.
pub fn loss_svg(train: &[(f64, f64)], eval: &[(f64, f64)]) -> String {
    let (w, h, margin) = (720.0, 420.0, 56.0);
    let all = train.iter().chain(eval).copied();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| margin + (x - x0) / (x1 - x0) * (w - 1.5 * margin);
    let py = |y: f64| h - margin - (y - y0) / (y1 - y0) * (h - 1.5 * margin);
    let line = |pts: &[(f64, f64)], color: &str| {
        if pts.is_empty() {
            return String::new();
        }
        let coords: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let dots: String = if pts.len() <= 64 {
            pts.iter()
                .map(|(x, y)| {
                    format!(
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{color}\"/>",
                        px(*x),
                        py(*y)
                    )
                })
                .collect()
        } else {
            String::new()
        };
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.8\" points=\"{}\"/>{dots}\n",
            coords.join(" ")
        )
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    // Axes with 5 ticks each.
    svg += &format!(
        "<path d=\"M{m},{t} V{b} H{r}\" stroke=\"black\" fill=\"none\"/>\n",
        m = margin,
        t = margin / 2.0,
        b = h - margin,
        r = w - margin / 2.0
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0}</text>\n",
            px(xv),
            h - margin + 16.0,
            xv
        );
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.3}</text>\n",
            margin - 6.0,
            py(yv) + 4.0,
            yv
        );
    }
    svg += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text>\n",
        w / 2.0,
        h - 12.0
    );
    svg += &line(train, "#1f77b4");
    svg += &line(eval, "#d62728");
    svg += &format!(
        "<text x=\"{:.1}\" y=\"20\" fill=\"#1f77b4\">train loss</text><text x=\"{:.1}\" y=\"20\" fill=\"#d62728\">eval loss</text>\n</svg>\n",
        w - 220.0,
        w - 130.0
    );
    svg
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_both_lines() {
        let svg = super::loss_svg(&[(1.0, 3.0), (2.0, 2.5)], &[(2.0, 2.7)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(!super::loss_svg(&[], &[]).contains("NaN"));
    }
}
