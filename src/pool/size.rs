//! Choosing a volume's size from a CSI capacity range. Pure functions.

pub const MIB: u64 = 1 << 20;

/// The largest size any volume can have: the largest whole MiB a CSI reply's
/// `capacity_bytes` (int64) can carry, which is also the largest file Linux allows
/// (`MAX_LFS_FILESIZE`, 2^63 - 1). A pool may allow less (see `Pool::maximum`).
pub const MAX_BYTES: u64 = i64::MAX as u64 / MIB * MIB;

/// A capacity range; 0 means unset, as in CSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Range {
    pub required: u64,
    pub limit: u64,
}

fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(MIB).saturating_mul(MIB)
}

fn round_down(bytes: u64) -> u64 {
    bytes / MIB * MIB
}

/// The size of a new volume: at least `required` (and at least `minimum`, the size of
/// a content source), rounded up to a whole MiB, at most `limit`; `default` when the
/// range asks for nothing. `Err` says why the range cannot be satisfied.
pub fn for_new_volume(range: Range, default: u64, minimum: u64) -> Result<u64, String> {
    let Range { required, limit } = range;
    if limit > 0 && required > limit {
        return Err(format!(
            "capacity_range: required_bytes {required} exceeds limit_bytes {limit}"
        ));
    }
    if minimum > 0 && required > 0 && required < minimum {
        return Err(format!(
            "capacity_range: required_bytes {required} is smaller than the source's {minimum} bytes"
        ));
    }
    if minimum > 0 && limit > 0 && limit < minimum {
        return Err(format!(
            "capacity_range: limit_bytes {limit} is smaller than the source's {minimum} bytes"
        ));
    }
    let wanted = if required > 0 {
        required
    } else if minimum > 0 {
        minimum
    } else if limit > 0 {
        default.min(limit)
    } else {
        default
    };
    fit(wanted, limit)
}

/// The new size of a volume of `current` bytes asked to grow to `range`: `None` when
/// it already satisfies the range.
pub fn for_expansion(range: Range, current: u64) -> Result<Option<u64>, String> {
    let Range { required, limit } = range;
    if limit > 0 && required > limit {
        return Err(format!(
            "capacity_range: required_bytes {required} exceeds limit_bytes {limit}"
        ));
    }
    if limit > 0 && current > limit {
        return Err(format!(
            "capacity_range: limit_bytes {limit} is below the current size {current}; volumes cannot shrink"
        ));
    }
    if required <= current {
        return Ok(None);
    }
    fit(required, limit).map(Some)
}

/// `wanted` rounded up to a MiB, or down to the limit's last whole MiB when that still
/// holds `wanted`.
fn fit(wanted: u64, limit: u64) -> Result<u64, String> {
    let size = round_up(wanted);
    if limit == 0 || size <= limit {
        return Ok(size);
    }
    let capped = round_down(limit);
    if capped >= wanted && capped > 0 {
        Ok(capped)
    } else {
        Err(format!(
            "capacity_range: no whole-MiB size lies between {wanted} and limit_bytes {limit}"
        ))
    }
}

/// Parses a size: bytes, or a number with a Kubernetes-style suffix (k/K, M, G, T, P
/// for powers of 1000; Ki, Mi, Gi, Ti, Pi for powers of 1024). A trailing `B` is
/// allowed (`20GiB`).
pub fn parse(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let trimmed = trimmed.strip_suffix('B').unwrap_or(trimmed);
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 20Gi, 512Mi, 20G, 1073741824)"))?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        other => return Err(format!("{text:?}: unknown size suffix {other:?}")),
    };
    let bytes = number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("{text:?}: a size must be more than zero"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn range(required: u64, limit: u64) -> Range {
        Range { required, limit }
    }

    #[test]
    fn new_volume_sizes() {
        let cases = [
            (range(0, 0), 0, Ok(GIB)),
            (range(1, 0), 0, Ok(MIB)),
            (range(10 * GIB, 10 * GIB), 0, Ok(10 * GIB)),
            (range(MIB + 1, 0), 0, Ok(2 * MIB)),
            (range(0, 5 * MIB), 0, Ok(5 * MIB)),
            (range(0, 0), 3 * MIB, Ok(3 * MIB)),
            (range(4 * MIB, 0), 3 * MIB, Ok(4 * MIB)),
            (range(10, 20), 0, Err(())),
            (range(2 * MIB, MIB), 0, Err(())),
            (range(MIB, 0), 3 * MIB, Err(())),
            (range(0, 2 * MIB), 3 * MIB, Err(())),
            (range(MIB + 1, MIB + 2), 0, Err(())),
        ];
        for (r, minimum, want) in cases {
            let got = for_new_volume(r, GIB, minimum).map_err(|_| ());
            assert_eq!(got, want, "{r:?} minimum {minimum}");
        }
    }

    #[test]
    fn unaligned_limit_rounds_down_when_it_still_fits() {
        assert_eq!(for_new_volume(range(MIB, 2 * MIB + 7), GIB, 0), Ok(MIB));
        assert_eq!(
            for_new_volume(range(MIB + 1, 2 * MIB + 7), GIB, 0),
            Ok(2 * MIB)
        );
    }

    #[test]
    fn expansion_sizes() {
        assert_eq!(for_expansion(range(2 * GIB, 0), GIB), Ok(Some(2 * GIB)));
        assert_eq!(for_expansion(range(GIB, 0), 2 * GIB), Ok(None));
        assert_eq!(for_expansion(range(2 * GIB, 0), 2 * GIB), Ok(None));
        assert!(for_expansion(range(GIB, GIB), 2 * GIB).is_err());
        assert!(for_expansion(range(3 * GIB, 2 * GIB), GIB).is_err());
    }
}
