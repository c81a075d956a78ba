//! Which lock a request names: a small fast RNG, the key distributions
//! (uniform, Zipf) and the key's name on the wire (`PREFIX` + decimal index).
//!
//! Keys are indices `0..n`. Under Zipf, index 0 is the most popular (rank 1),
//! index 1 the next, and so on; the server hashes names to shards, so the hot
//! keys still spread over its loops.
//!
//! Nothing here allocates after construction: sampling is O(1) (the Zipf
//! sampler is rejection-inversion, no table), and names are written into a
//! caller-owned buffer.

/// xoshiro256** — fast, small state, good enough for load generation (not
/// for anything secret). Seeded through SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (n > 0), by Lemire's multiply-shift (bias < n / 2^64).
    pub fn below(&mut self, n: u32) -> u32 {
        assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u32
    }
}

/// Zipf over ranks `1..=n` with exponent `s > 0`: P(k) ∝ k^-s.
///
/// Rejection-inversion (W. Hörmann and G. Derflinger, "Rejection-inversion to
/// generate variates from monotone discrete distributions", 1996), as in
/// Apache Commons RNG: constant memory and expected O(1) time for any n.
#[derive(Debug, Clone)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    threshold: f64,
}

impl Zipf {
    pub fn new(n: u32, s: f64) -> Zipf {
        assert!(n >= 1, "zipf needs at least one key");
        assert!(s.is_finite() && s > 0.0, "zipf exponent must be > 0");
        let mut z = Zipf {
            n: f64::from(n),
            s,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            threshold: 0.0,
        };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(z.n + 0.5);
        z.threshold = 2.0 - z.h_integral_inv(z.h_integral(2.5) - z.h(2.0));
        z
    }

    /// The exponent `s`.
    pub fn exponent(&self) -> f64 {
        self.s
    }

    /// A rank in `1..=n`.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        loop {
            let u = self.h_integral_n + rng.next_f64() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inv(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.threshold || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u32;
            }
        }
    }

    /// h(x) = x^-s.
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    /// H(x) = (x^(1-s) - 1) / (1 - s), continuous at s = 1 (ln x).
    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.s) * log_x) * log_x
    }

    /// The inverse of H.
    fn h_integral_inv(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (helper1(t) * x).exp()
    }
}

/// ln(1 + x) / x, accurate near 0.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// (e^x - 1) / x, accurate near 0.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x * (1.0 / 3.0) * (1.0 + 0.25 * x))
    }
}

/// How keys are drawn from `0..n`.
#[derive(Debug, Clone)]
pub enum KeySampler {
    Uniform { n: u32 },
    Zipf(Zipf),
}

impl KeySampler {
    pub fn uniform(n: u32) -> KeySampler {
        assert!(n >= 1);
        KeySampler::Uniform { n }
    }

    pub fn zipf(n: u32, s: f64) -> KeySampler {
        KeySampler::Zipf(Zipf::new(n, s))
    }

    /// A key index in `0..n`.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        match self {
            KeySampler::Uniform { n } => rng.below(*n),
            KeySampler::Zipf(z) => z.sample(rng) - 1,
        }
    }

    pub fn keys(&self) -> u32 {
        match self {
            KeySampler::Uniform { n } => *n,
            KeySampler::Zipf(z) => z.n as u32,
        }
    }
}

/// Writes `prefix` + the decimal `key` into `out` (cleared first).
pub fn key_name(out: &mut Vec<u8>, prefix: &[u8], key: u32) {
    out.clear();
    out.extend_from_slice(prefix);
    push_decimal(out, u64::from(key));
}

/// Appends the decimal digits of `n`.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_names() {
        let mut out = Vec::new();
        key_name(&mut out, b"k:", 0);
        assert_eq!(out, b"k:0");
        key_name(&mut out, b"", 1234567890);
        assert_eq!(out, b"1234567890");
        out.clear();
        push_decimal(&mut out, u64::MAX);
        assert_eq!(out, u64::MAX.to_string().as_bytes());
    }

    #[test]
    fn uniform_covers_the_range_evenly() {
        let mut rng = Rng::new(7);
        let sampler = KeySampler::uniform(10);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            counts[sampler.sample(&mut rng) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    /// Empirical frequencies against P(k) = k^-s / H(n, s), for several s
    /// (including s = 1, where the sampler's formulas switch to logs) and a
    /// chi-square-like bound on the head of the distribution.
    #[test]
    fn zipf_matches_the_distribution() {
        const DRAWS: u32 = 400_000;
        for (n, s) in [(100u32, 0.99), (1000, 1.0), (50, 1.5), (20, 0.5)] {
            let sampler = KeySampler::zipf(n, s);
            let mut rng = Rng::new(u64::from(n) ^ s.to_bits());
            let mut counts = vec![0u32; n as usize];
            for _ in 0..DRAWS {
                let k = sampler.sample(&mut rng);
                assert!(k < n);
                counts[k as usize] += 1;
            }
            let norm: f64 = (1..=n).map(|k| f64::from(k).powf(-s)).sum();
            for k in 1..=10.min(n) {
                let p = f64::from(k).powf(-s) / norm;
                let expected = p * f64::from(DRAWS);
                let got = f64::from(counts[k as usize - 1]);
                // 5 standard deviations of a binomial count.
                let sigma = (expected * (1.0 - p)).sqrt();
                assert!(
                    (got - expected).abs() < 5.0 * sigma + 1.0,
                    "n={n} s={s} rank {k}: got {got}, expected {expected:.0}"
                );
            }
            // Popularity decreases with rank (on the head, where counts are large).
            assert!(
                counts[0] > counts[1] && counts[1] > counts[3],
                "n={n} s={s}"
            );
        }
    }

    #[test]
    fn zipf_edge_cases() {
        let mut rng = Rng::new(1);
        let one = KeySampler::zipf(1, 0.99);
        assert!((0..1000).all(|_| one.sample(&mut rng) == 0));
        let big = KeySampler::zipf(u32::MAX, 0.99);
        for _ in 0..10_000 {
            let _ = big.sample(&mut rng);
        }
        assert_eq!(big.keys(), u32::MAX);
    }
}
