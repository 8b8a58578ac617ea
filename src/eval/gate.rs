//! Quality gates: `METRIC OP VALUE`, where VALUE is a number, or relative to
//! `base` (the first model's value): `base`, `FACTOR*base`, `base+X`,
//! `base-X` or `FACTOR*base±X`; e.g. `ppl<=1.05*base`, `humaneval>=base-0.02`.

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Le,
    Lt,
    Ge,
    Gt,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Rhs {
    Number(f64),
    /// factor × the base model's value + offset
    Base {
        factor: f64,
        offset: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    pub text: String,
    pub metric: String,
    pub op: Op,
    pub rhs: Rhs,
}

#[derive(Debug, thiserror::Error)]
#[error("--gate '{text}': {msg} (expected METRIC OP VALUE, e.g. 'ppl<=1.05*base')")]
pub struct GateError {
    pub text: String,
    pub msg: String,
}

impl Gate {
    pub fn parse(text: &str, metrics: &[&str]) -> Result<Self, GateError> {
        let err = |msg: String| GateError {
            text: text.into(),
            msg,
        };
        let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let (pos, op, len) = ["<=", ">=", "<", ">"]
            .iter()
            .find_map(|o| t.find(o).map(|p| (p, *o, o.len())))
            .ok_or_else(|| err("no comparison operator".into()))?;
        let metric = t[..pos].to_string();
        if !metrics.contains(&metric.as_str()) {
            return Err(err(format!(
                "unknown metric `{metric}` (known: {})",
                metrics.join(", ")
            )));
        }
        let op = match op {
            "<=" => Op::Le,
            ">=" => Op::Ge,
            "<" => Op::Lt,
            _ => Op::Gt,
        };
        let rhs_text = &t[pos + len..];
        let rhs =
            if let Some(at) = rhs_text.find("base") {
                let (before, after) = (&rhs_text[..at], &rhs_text[at + 4..]);
                let factor = match before {
                    "" => 1.0,
                    f => f
                        .strip_suffix('*')
                        .and_then(|f| f.parse().ok())
                        .ok_or_else(|| err(format!("`{f}` is not FACTOR*")))?,
                };
                let offset = match after {
                    "" => 0.0,
                    o if o.starts_with(['+', '-']) => o
                        .parse()
                        .map_err(|_| err(format!("`{o}` is not +NUMBER or -NUMBER")))?,
                    o => return Err(err(format!("unexpected `{o}` after `base`"))),
                };
                Rhs::Base { factor, offset }
            } else {
                Rhs::Number(rhs_text.parse().map_err(|_| {
                    err(format!("`{rhs_text}` is not a number or relative to base"))
                })?)
            };
        Ok(Self {
            text: text.into(),
            metric,
            op,
            rhs,
        })
    }

    pub fn needs_base(&self) -> bool {
        matches!(self.rhs, Rhs::Base { .. })
    }

    /// The threshold and whether `value` passes it.
    pub fn check(&self, value: f64, base: Option<f64>) -> Option<(f64, bool)> {
        let limit = match self.rhs {
            Rhs::Number(x) => x,
            Rhs::Base { factor, offset } => factor * base? + offset,
        };
        let pass = match self.op {
            Op::Le => value <= limit,
            Op::Lt => value < limit,
            Op::Ge => value >= limit,
            Op::Gt => value > limit,
        };
        Some((limit, pass))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let g = Gate::parse("ppl <= 1.05*base", &["ppl"]).unwrap();
        assert_eq!(g.check(10.4, Some(10.0)), Some((10.5, true)));
        assert_eq!(g.check(10.6, Some(10.0)).map(|c| c.1), Some(false));
        let g = Gate::parse("ppl<12", &["ppl"]).unwrap();
        assert_eq!(g.check(12.0, None).map(|c| c.1), Some(false));
        assert!(Gate::parse("pl<=base", &["ppl"])
            .unwrap_err()
            .to_string()
            .contains("unknown metric"));
        assert!(Gate::parse("ppl=3", &["ppl"]).is_err());
        assert!(Gate::parse("ppl<=x*base", &["ppl"]).is_err());
        let g = Gate::parse("humaneval >= base-0.02", &["humaneval"]).unwrap();
        let (limit, pass) = g.check(0.29, Some(0.3)).unwrap();
        assert!((limit - 0.28).abs() < 1e-12 && pass);
        assert_eq!(g.check(0.27, Some(0.3)).map(|c| c.1), Some(false));
        let g = Gate::parse("ppl<=2*base+0.5", &["ppl"]).unwrap();
        assert_eq!(g.check(1.0, Some(1.0)), Some((2.5, true)));
        assert!(Gate::parse("ppl<=base*2", &["ppl"]).is_err());
        assert!(Gate::parse("ppl<=base-x", &["ppl"]).is_err());
    }
}
