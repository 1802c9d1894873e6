//! Hashing and seeds: one FNV-1a, one SplitMix64 finaliser and one per-turn seed, so that every
//! stage derives its randomness the same way (position- and name-keyed, never draw-order-keyed).

/// 64-bit FNV-1a: stable across platforms and releases (unlike `std`'s hasher), so hashes can be
/// stored in manifests and used for splits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64 finaliser: spreads FNV's weak low bits before ranking or seeding.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of one turn of one conversation: keyed by (seed, scope, id, turn), so it is the same
/// for every run of that turn (AR and each drafter sample the same numbers) and differs across
/// turns, conversations and scopes (a benchmark's name, or `regenerate`).
pub fn turn_seed(seed: u64, scope: &str, id: &str, turn: usize) -> u64 {
    let key = format!("{scope}\u{0}{id}\u{0}{turn}");
    splitmix64(seed ^ fnv1a64(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn turn_seeds_depend_on_every_key_part() {
        let s = turn_seed(0, "gsm8k", "q1", 0);
        assert_eq!(s, turn_seed(0, "gsm8k", "q1", 0));
        for other in [turn_seed(1, "gsm8k", "q1", 0), turn_seed(0, "mbpp", "q1", 0), turn_seed(0, "gsm8k", "q2", 0), turn_seed(0, "gsm8k", "q1", 1)] {
            assert_ne!(s, other);
        }
    }
}
