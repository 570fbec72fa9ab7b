//! Bandwidth groups: a byte rate and an operation rate shared by every attachment that names
//! the group (`--bwgroup name=G,limit=20M[,iops=N]`). Each is a token bucket that may go into
//! debt by one request, so a request larger than a bucket's burst still passes and the
//! average rate stays right; a request that finds a bucket in debt waits.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much a bucket may save up while idle: a tenth of a second of its rate.
const BURST: Duration = Duration::from_millis(100);

/// A `--bwgroup` value, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandwidthGroupSpec {
    pub name: String,
    /// Bytes per second; 0 is unlimited.
    pub limit: u64,
    /// Requests per second; 0 is unlimited.
    pub iops: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BandwidthSpecError {
    #[error("--bwgroup needs name=NAME (e.g. --bwgroup name=disks,limit=20M)")]
    MissingName,
    #[error("--bwgroup {0}: the group name may only use letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("--bwgroup: '{0}' is not KEY=VALUE; the keys are name, limit and iops")]
    NotKeyValue(String),
    #[error("--bwgroup: unknown key '{0}'; the keys are name, limit and iops")]
    UnknownKey(String),
    #[error("--bwgroup: '{key}' is given twice")]
    Repeated { key: String },
    #[error("--bwgroup: limit '{0}' is not bytes per second (a number with an optional K, M or G suffix; 0 is unlimited)")]
    BadLimit(String),
    #[error("--bwgroup: iops '{0}' is not a whole number of requests per second (0 is unlimited)")]
    BadIops(String),
}

/// Parses a byte rate: a number with an optional K, M or G suffix (powers of 1024, as every
/// size on ferry's command line).
pub fn parse_rate(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

impl FromStr for BandwidthGroupSpec {
    type Err = BandwidthSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut name, mut limit, mut iops) = (None, None, None);
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| BandwidthSpecError::NotKeyValue(part.into()))?;
            let slot_taken = |key: &str| BandwidthSpecError::Repeated { key: key.into() };
            match key {
                "name" => {
                    if name.is_some() {
                        return Err(slot_taken(key));
                    }
                    let ok = !value.is_empty()
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                    if !ok {
                        return Err(BandwidthSpecError::BadName(value.into()));
                    }
                    name = Some(value.to_string());
                }
                "limit" => {
                    if limit.is_some() {
                        return Err(slot_taken(key));
                    }
                    limit = Some(
                        parse_rate(value)
                            .ok_or_else(|| BandwidthSpecError::BadLimit(value.into()))?,
                    );
                }
                "iops" => {
                    if iops.is_some() {
                        return Err(slot_taken(key));
                    }
                    let ok = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
                    iops = Some(
                        value
                            .parse::<u64>()
                            .ok()
                            .filter(|_| ok)
                            .ok_or_else(|| BandwidthSpecError::BadIops(value.into()))?,
                    );
                }
                other => return Err(BandwidthSpecError::UnknownKey(other.into())),
            }
        }
        Ok(Self {
            name: name.ok_or(BandwidthSpecError::MissingName)?,
            limit: limit.unwrap_or(0),
            iops: iops.unwrap_or(0),
        })
    }
}

/// One rate: `rate` tokens a second, 0 for unlimited.
#[derive(Debug)]
struct Bucket {
    rate: u64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            tokens: burst(rate),
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        if self.rate > 0 {
            let cap = burst(self.rate);
            self.tokens = (self.tokens + self.rate as f64 * elapsed.as_secs_f64()).min(cap);
        }
    }

    /// How long until the bucket is out of debt (zero: it is).
    fn wait(&self) -> Duration {
        if self.rate == 0 || self.tokens > 0.0 {
            Duration::ZERO
        } else {
            // The extra nanosecond makes the bucket positive when the waiter returns.
            Duration::from_secs_f64(-self.tokens / self.rate as f64) + Duration::from_nanos(1)
        }
    }

    fn set_rate(&mut self, rate: u64) {
        self.rate = rate;
        // A new limit starts from a fresh burst: old debt at a slow rate would otherwise
        // delay a raised limit by much more than the 100 ms it must apply within.
        self.tokens = burst(rate);
    }
}

fn burst(rate: u64) -> f64 {
    rate as f64 * BURST.as_secs_f64()
}

#[derive(Debug)]
struct Buckets {
    bytes: Bucket,
    ops: Bucket,
    last: Instant,
}

/// The runtime group, shared (in an `Arc`) by the engines of every attachment that names it.
#[derive(Debug)]
pub struct BandwidthGroup {
    name: String,
    state: Mutex<Buckets>,
}

impl BandwidthGroup {
    pub fn new(spec: &BandwidthGroupSpec) -> Self {
        Self {
            name: spec.name.clone(),
            state: Mutex::new(Buckets {
                bytes: Bucket::new(spec.limit),
                ops: Bucket::new(spec.iops),
                last: Instant::now(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        // The state is two numbers: a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes per second (0: unlimited).
    pub fn limit(&self) -> u64 {
        self.lock().bytes.rate
    }

    pub fn iops(&self) -> u64 {
        self.lock().ops.rate
    }

    /// Changes the byte rate while requests flow; waiting requests see it within 100 ms.
    pub fn set_limit(&self, bytes_per_sec: u64) {
        self.lock().bytes.set_rate(bytes_per_sec);
        tracing::info!(
            "bandwidth group {}: limit {}",
            self.name,
            Rate(bytes_per_sec)
        );
    }

    pub fn set_iops(&self, per_sec: u64) {
        self.lock().ops.set_rate(per_sec);
        tracing::info!(
            "bandwidth group {}: {} requests per second",
            self.name,
            per_sec
        );
    }

    /// Takes `bytes` and one operation if the group is not in debt; otherwise says how long
    /// to wait before asking again.
    pub fn try_take(&self, bytes: u64) -> Result<(), Duration> {
        self.try_take_at(bytes, Instant::now())
    }

    /// `try_take` at a given time (tests drive a simulated clock with it).
    fn try_take_at(&self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let mut st = self.lock();
        let elapsed = now.saturating_duration_since(st.last);
        st.last = now;
        st.bytes.refill(elapsed);
        st.ops.refill(elapsed);
        let wait = st.bytes.wait().max(st.ops.wait());
        if !wait.is_zero() {
            return Err(wait);
        }
        if st.bytes.rate > 0 {
            st.bytes.tokens -= bytes as f64;
        }
        if st.ops.rate > 0 {
            st.ops.tokens -= 1.0;
        }
        Ok(())
    }
}

/// Every `--bwgroup` of a VM, by name: attachments that name a group share its object.
#[derive(Debug, Default)]
pub struct BandwidthGroups {
    groups: std::collections::BTreeMap<String, Arc<BandwidthGroup>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BandwidthGroupsError {
    #[error("--bwgroup {0} is given twice; give each group once")]
    Duplicate(String),
    #[error("bandwidth group '{name}' is not defined; add --bwgroup name={name},limit=RATE (known: {known})")]
    Unknown { name: String, known: String },
}

impl BandwidthGroups {
    pub fn new(specs: &[BandwidthGroupSpec]) -> Result<Self, BandwidthGroupsError> {
        let mut groups = std::collections::BTreeMap::new();
        for spec in specs {
            if groups
                .insert(spec.name.clone(), Arc::new(BandwidthGroup::new(spec)))
                .is_some()
            {
                return Err(BandwidthGroupsError::Duplicate(spec.name.clone()));
            }
        }
        Ok(Self { groups })
    }

    /// The group an attachment's `bwgroup=NAME` names.
    pub fn get(&self, name: &str) -> Result<Arc<BandwidthGroup>, BandwidthGroupsError> {
        self.groups
            .get(name)
            .cloned()
            .ok_or_else(|| BandwidthGroupsError::Unknown {
                name: name.into(),
                known: if self.groups.is_empty() {
                    "none".into()
                } else {
                    self.groups.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })
    }
}

/// A byte rate as the user writes it.
struct Rate(u64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => write!(f, "unlimited"),
            n if n % (1 << 30) == 0 => write!(f, "{}G bytes/s", n >> 30),
            n if n % (1 << 20) == 0 => write!(f, "{}M bytes/s", n >> 20),
            n if n % (1 << 10) == 0 => write!(f, "{}K bytes/s", n >> 10),
            n => write!(f, "{n} bytes/s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s: BandwidthGroupSpec = "name=G,limit=20M".parse().unwrap();
        assert_eq!(
            s,
            BandwidthGroupSpec {
                name: "G".into(),
                limit: 20 << 20,
                iops: 0
            }
        );
        let s: BandwidthGroupSpec = "limit=512k,name=slow-1,iops=300".parse().unwrap();
        assert_eq!((s.limit, s.iops), (512 << 10, 300));
        let s: BandwidthGroupSpec = "name=x,limit=0".parse().unwrap();
        assert_eq!(s.limit, 0);
        assert_eq!(parse_rate("3G"), Some(3 << 30));
        assert_eq!(parse_rate("100"), Some(100));
    }

    #[test]
    fn rejects_bad_specs() {
        use BandwidthSpecError::*;
        let bad = |s: &str| s.parse::<BandwidthGroupSpec>().unwrap_err();
        assert_eq!(bad("limit=20M"), MissingName);
        assert_eq!(bad("name=a b"), BadName("a b".into()));
        assert_eq!(bad("name="), BadName("".into()));
        assert_eq!(bad("name=a,limit=20X"), BadLimit("20X".into()));
        assert_eq!(bad("name=a,limit=M"), BadLimit("M".into()));
        assert_eq!(bad("name=a,limit=-1"), BadLimit("-1".into()));
        assert_eq!(
            bad("name=a,limit=99999999999999999999G"),
            BadLimit("99999999999999999999G".into())
        );
        assert_eq!(
            bad("name=a,limit=20000000000G"),
            BadLimit("20000000000G".into())
        );
        assert_eq!(bad("name=a,iops=1.5"), BadIops("1.5".into()));
        assert_eq!(bad("name=a,iops=+5"), BadIops("+5".into()));
        assert_eq!(bad("name=a,speed=1"), UnknownKey("speed".into()));
        assert_eq!(bad("name=a,limit"), NotKeyValue("limit".into()));
        assert_eq!(bad("name=a,name=b"), Repeated { key: "name".into() });
    }

    /// Takes requests of `req` bytes as fast as the group lets them through, on a simulated
    /// clock starting at `t`, for `secs`; returns the rate and the clock's end.
    fn measure(g: &BandwidthGroup, req: u64, t: Instant, secs: f64) -> (f64, Instant) {
        let mut now = t;
        // Spend the saved-up burst first: the rate is what follows it.
        while g.try_take_at(req, now).is_ok() {}
        let start = now;
        let end = start + Duration::from_secs_f64(secs);
        let mut moved = 0u64;
        while now < end {
            match g.try_take_at(req, now) {
                Ok(()) => moved += req,
                // A waiter is woken a little late, as a real one is.
                Err(w) => now += w + Duration::from_micros(300),
            }
        }
        (moved as f64 / (now - start).as_secs_f64(), now)
    }

    #[test]
    fn bucket_holds_the_rate_and_follows_changes() {
        let g = BandwidthGroup::new(&"name=t,limit=10M".parse().unwrap());
        let t = Instant::now();
        let (r, t) = measure(&g, 64 << 10, t, 2.0);
        let want = 10.0 * (1 << 20) as f64;
        assert!((r - want).abs() < want * 0.02, "{r} bytes/s, want {want}");
        g.set_limit(40 << 20);
        // Requests larger than the burst still pass, at the rate.
        let (r, _) = measure(&g, 8 << 20, t, 4.0);
        let want = 40.0 * (1 << 20) as f64;
        assert!((r - want).abs() < want * 0.05, "{r} bytes/s, want {want}");
        // Unlimited: nothing waits.
        g.set_limit(0);
        assert!((0..1000).all(|_| g.try_take(1 << 30).is_ok()));
    }

    #[test]
    fn attachments_share_a_group_by_name() {
        let specs: Vec<BandwidthGroupSpec> = ["name=a,limit=1M", "name=b,iops=10"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let groups = BandwidthGroups::new(&specs).unwrap();
        let (one, two) = (groups.get("a").unwrap(), groups.get("a").unwrap());
        assert!(Arc::ptr_eq(&one, &two));
        one.set_limit(5 << 20);
        assert_eq!(two.limit(), 5 << 20);
        assert_eq!(groups.get("b").unwrap().iops(), 10);
        let err = groups.get("c").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bandwidth group 'c' is not defined; add --bwgroup name=c,limit=RATE (known: a, b)"
        );
        let twice = [specs[0].clone(), specs[0].clone()];
        assert_eq!(
            BandwidthGroups::new(&twice).unwrap_err(),
            BandwidthGroupsError::Duplicate("a".into())
        );
    }

    #[test]
    fn iops_limit() {
        let g = BandwidthGroup::new(&"name=t,iops=1000".parse().unwrap());
        let (r, _) = measure(&g, 1, Instant::now(), 2.0);
        assert!((r - 1000.0).abs() < 20.0, "{r} ops/s");
    }
}
