//! Weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, section 3.4).
//!
//! The lookup table has `M` slots (`M` prime). Every backend derives a permutation of the slots
//! from its stable id: `offset = h1 % M`, `skip = h2 % (M - 1) + 1`, and its `j`-th preferred slot
//! is `(offset + j * skip) % M`. Because `M` is prime and `1 <= skip < M`, that sequence visits
//! every slot exactly once. Backends then take turns claiming their next preferred slot that is
//! still free, until the table is full.
//!
//! Why: with equal weights the turns are plain round robin, so slot counts differ by at most one;
//! and because each backend's preferences depend only on its own id, removing or adding a backend
//! mostly moves only the slots it loses or gains (close to the ideal `1/N`), unlike `hash % N`
//! which remaps almost everything. The excess over `1/N` grows with `N / M` (a changed fill order
//! hands some contested slots to another survivor), hence the paper's advice `M >= 100 N`.
//!
//! Weights (as in Katran's `MaglevHashV2`): a backend with weight `w` takes its `k`-th turn in round
//! `ceil(k * w_max / w)`, so over the fill it takes turns, and therefore slots, in proportion to
//! its weight. Turns in the same round go in id order. Weight 0 takes no turn (draining).
//!
//! Determinism: the hashes are SipHash-2-4 over the id's little-endian bytes with fixed keys
//! derived from the seed, and backends are ordered by id internally, so every node computes the
//! same table for the same set of backends regardless of input order, machine or Rust version.
//!
//! Cost: `O(N)` hashes plus `O(M log N)` turns and about `M ln M` slot probes in total; the
//! permutations are computed on the fly, never materialised as an `M x N` table.

use std::{cmp::Reverse, collections::BinaryHeap, net::IpAddr};

/// Default table size: prime, and large enough for ~160 backends at the recommended `M >= 100 N`.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;
/// Smallest accepted table size.
pub const MIN_TABLE_SIZE: u32 = 251;
/// Largest accepted table size (2^17 - 1, a Mersenne prime).
pub const MAX_TABLE_SIZE: u32 = 131071;

/// Fixed second halves of the SipHash keys for the two independent hashes (ASCII "maglev-o" and
/// "maglev-s"). Changing them changes every table, so nodes running different versions would
/// disagree: treat them, like the seed, as part of the cross-node contract.
const OFFSET_KEY: u64 = 0x6d61_676c_6576_2d6f;
const SKIP_KEY: u64 = 0x6d61_676c_6576_2d73;

/// Marks a slot not yet claimed while the table is being filled.
const FREE: u32 = u32::MAX;

/// Why a Maglev table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error(
        "maglev table size {0} is out of range: it must be a prime between {min} and {max}",
        min = MIN_TABLE_SIZE,
        max = MAX_TABLE_SIZE
    )]
    TableSizeOutOfRange(u32),
    #[error("maglev table size {0} is not prime")]
    TableSizeNotPrime(u32),
    #[error("backend id {0:#x} is given more than once")]
    DuplicateBackendId(u64),
    #[error("too many backends: {0}")]
    TooManyBackends(usize),
}

/// One backend as Maglev sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Stable identity, the same on every node (see [`backend_id`]). Ids must be unique.
    pub id: u64,
    /// Relative share of the slots. 0 means the backend owns no slot (draining).
    pub weight: u32,
}

/// A stable backend id from its address and port: `address << 16 | port` for IPv4; for IPv6 a
/// SipHash of the address (keyed by its two halves) and port, with the top bit set so that it can
/// never equal an IPv4 id.
pub fn backend_id(address: impl Into<IpAddr>, port: u16) -> u64 {
    match address.into() {
        IpAddr::V4(v4) => (u64::from(u32::from(v4)) << 16) | u64::from(port),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            siphash24((bits >> 64) as u64, bits as u64, u64::from(port)) | (1 << 63)
        }
    }
}

/// Checks that `m` is a prime in `MIN_TABLE_SIZE..=MAX_TABLE_SIZE`.
pub fn validate_table_size(m: u32) -> Result<(), MaglevError> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&m) {
        return Err(MaglevError::TableSizeOutOfRange(m));
    }
    if !is_prime(m) {
        return Err(MaglevError::TableSizeNotPrime(m));
    }
    Ok(())
}

/// Builds the Maglev lookup table of `table_size` slots.
///
/// Each entry of the result is the index into `backends` of the backend owning that slot. The
/// result depends only on the set of (id, weight) pairs and the seed, not on their order in
/// `backends`. If no backend has a non-zero weight the result is an empty `Vec` ("no backend").
/// `seed` must be the same on every node that has to agree on the table.
///
/// Errors: invalid `table_size` (see [`validate_table_size`]), a duplicate backend id, or (only
/// in theory) `u32::MAX` or more backends.
pub fn build_table(
    backends: &[MaglevBackend],
    table_size: u32,
    seed: u64,
) -> Result<Vec<u32>, MaglevError> {
    validate_table_size(table_size)?;
    // Indexes must fit in u32 and stay below the FREE marker.
    if backends.len() >= FREE as usize {
        return Err(MaglevError::TooManyBackends(backends.len()));
    }

    // Canonical order: by id, so that the caller's order does not change the table.
    let mut by_id: Vec<u32> = (0..backends.len() as u32).collect();
    by_id.sort_unstable_by_key(|&i| backends[i as usize].id);
    if let Some(pair) = by_id
        .windows(2)
        .find(|p| backends[p[0] as usize].id == backends[p[1] as usize].id)
    {
        return Err(MaglevError::DuplicateBackendId(
            backends[pair[0] as usize].id,
        ));
    }
    by_id.retain(|&i| backends[i as usize].weight > 0);
    if by_id.is_empty() {
        return Ok(Vec::new());
    }

    let m = u64::from(table_size);
    let max_weight = by_id
        .iter()
        .map(|&i| u64::from(backends[i as usize].weight))
        .max()
        .unwrap_or(1);
    let mut cursors: Vec<Cursor> = by_id
        .iter()
        .map(|&i| Cursor::new(backends[i as usize], m, seed))
        .collect();

    // Min-heap of (round of the backend's next turn, rank in id order).
    let mut turns: BinaryHeap<Reverse<(u64, usize)>> = cursors
        .iter()
        .enumerate()
        .map(|(rank, c)| Reverse((c.round_of_turn(1, max_weight), rank)))
        .collect();

    let mut table = vec![FREE; table_size as usize];
    for _ in 0..table_size {
        // Never empty: every popped entry is pushed back with its next turn.
        let Some(Reverse((_, rank))) = turns.pop() else {
            break;
        };
        let cursor = &mut cursors[rank];
        // The permutation visits every slot once, so a free slot is found within M steps.
        while table[cursor.slot as usize] != FREE {
            cursor.advance(m);
        }
        table[cursor.slot as usize] = by_id[rank];
        cursor.advance(m);
        cursor.turns_taken += 1;
        turns.push(Reverse((
            cursor.round_of_turn(cursor.turns_taken + 1, max_weight),
            rank,
        )));
    }
    Ok(table)
}

/// Slots owned by each backend index `0..backends` of a table from [`build_table`]. Entries
/// `>= backends` are not counted.
pub fn slot_counts(table: &[u32], backends: usize) -> Vec<u32> {
    let mut counts = vec![0u32; backends];
    for &owner in table {
        if let Some(c) = counts.get_mut(owner as usize) {
            *c += 1;
        }
    }
    counts
}

/// Maps a table of indexes into `backends` to the owners' ids, for comparing tables built from
/// different backend lists (indexes shift when a backend is added or removed; ids do not).
///
/// Panics if an entry is not an index into `backends`.
pub fn owner_ids(table: &[u32], backends: &[MaglevBackend]) -> Vec<u64> {
    table.iter().map(|&i| backends[i as usize].id).collect()
}

/// Fraction of slots whose owner changed between two tables of owner ids (see [`owner_ids`]).
///
/// Tables of different lengths map flows to slots differently, so every slot counts as changed
/// (1.0); two empty tables give 0.0.
pub fn disruption(old: &[u64], new: &[u64]) -> f64 {
    if old.len() != new.len() {
        return 1.0;
    }
    if old.is_empty() {
        return 0.0;
    }
    let moved = old.iter().zip(new).filter(|(a, b)| a != b).count();
    moved as f64 / old.len() as f64
}

/// A backend's walk along its permutation while the table is filled.
struct Cursor {
    /// Current slot: `(offset + j * skip) % M` for the `j`-th step.
    slot: u64,
    skip: u64,
    weight: u64,
    turns_taken: u64,
}

impl Cursor {
    fn new(backend: MaglevBackend, m: u64, seed: u64) -> Self {
        let h1 = siphash24(seed, OFFSET_KEY, backend.id);
        let h2 = siphash24(seed, SKIP_KEY, backend.id);
        Self {
            slot: h1 % m,
            skip: h2 % (m - 1) + 1,
            weight: u64::from(backend.weight),
            turns_taken: 0,
        }
    }

    /// Next preferred slot: adds `skip` modulo `M` (both operands are below `M`).
    fn advance(&mut self, m: u64) {
        self.slot += self.skip;
        if self.slot >= m {
            self.slot -= m;
        }
    }

    /// Round in which the `k`-th turn (k >= 1) falls: `ceil(k * w_max / w)`. The backend's credit
    /// grows by `w` per round and a turn costs `w_max`, so it never takes two turns in one round.
    /// No overflow: `k <= M < 2^17` and `w_max < 2^32`.
    fn round_of_turn(&self, k: u64, max_weight: u64) -> u64 {
        (k * max_weight).div_ceil(self.weight)
    }
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// SipHash-2-4 of one 8-byte message (`msg.to_le_bytes()`) under the key `(k0, k1)`. Written out
/// so that its output is fixed by the specification, unlike std's `DefaultHasher`.
fn siphash24(k0: u64, k1: u64, msg: u64) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    // The single full block, then the final block holding only the message length (8) in its
    // top byte.
    for block in [msg, 8u64 << 56] {
        v[3] ^= block;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= block;
    }
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const SEED: u64 = 0x5eed;

    /// `n` backends with ids spread like real address:port ids, all of weight `weight`.
    fn equal(n: u32, weight: u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                id: backend_id(Ipv4Addr::from(0x0a00_0001 + i), 8080),
                weight,
            })
            .collect()
    }

    fn ids(backends: &[MaglevBackend], seed: u64, m: u32) -> Vec<u64> {
        owner_ids(&build_table(backends, m, seed).unwrap(), backends)
    }

    /// Tiny deterministic PRNG (xorshift64*) for shuffles; no dev-dependency needed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, (self.next() % (i as u64 + 1)) as usize);
            }
        }
    }

    #[test]
    fn siphash_matches_reference_vector() {
        // Reference implementation's vectors.h: key 00..0f, message 00..07.
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(siphash24(k0, k1, msg), 0x93f5_f579_9a93_2462);
    }

    #[test]
    #[allow(deprecated)]
    fn siphash_matches_std_siphasher() {
        use std::hash::{Hasher, SipHasher};
        let mut rng = Rng(7);
        for _ in 0..1000 {
            let (k0, k1, msg) = (rng.next(), rng.next(), rng.next());
            let mut h = SipHasher::new_with_keys(k0, k1);
            h.write(&msg.to_le_bytes());
            assert_eq!(siphash24(k0, k1, msg), h.finish());
        }
    }

    #[test]
    fn equal_weights_differ_by_at_most_one_slot() {
        for m in [DEFAULT_TABLE_SIZE, 65537] {
            for n in [1, 3, 7, 10, 100] {
                let backends = equal(n, 1);
                let table = build_table(&backends, m, SEED).unwrap();
                assert_eq!(table.len(), m as usize);
                let counts = slot_counts(&table, backends.len());
                assert_eq!(counts.iter().sum::<u32>(), m);
                // Round-robin fill: every backend gets floor(M/N) or ceil(M/N) slots, which is
                // within 1% of M/N because M/N >= 163 here.
                let (lo, hi) = (m / n, m.div_ceil(n));
                for &c in &counts {
                    assert!((lo..=hi).contains(&c), "m={m} n={n}: {counts:?}");
                    let ideal = f64::from(m) / f64::from(n);
                    assert!((f64::from(c) - ideal).abs() <= 0.01 * ideal);
                }
            }
        }
    }

    #[test]
    fn equal_weights_other_than_one_match_weight_one() {
        let ones = equal(10, 1);
        let sevens = equal(10, 7);
        assert_eq!(
            build_table(&ones, DEFAULT_TABLE_SIZE, SEED).unwrap(),
            build_table(&sevens, DEFAULT_TABLE_SIZE, SEED).unwrap()
        );
    }

    #[test]
    fn weights_are_honoured() {
        let cases: [&[u32]; 4] = [
            &[1, 2, 3, 4],
            &[1, 2, 3, 4, 0],
            &[100, 1, 50, 25, 0, 7],
            &[u32::MAX, 1, u32::MAX / 2],
        ];
        for weights in cases {
            let mut backends = equal(weights.len() as u32, 1);
            for (b, &w) in backends.iter_mut().zip(weights) {
                b.weight = w;
            }
            let m = DEFAULT_TABLE_SIZE;
            let table = build_table(&backends, m, SEED).unwrap();
            let counts = slot_counts(&table, backends.len());
            assert_eq!(counts.iter().sum::<u32>(), m);
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            let n = weights.iter().filter(|&&w| w > 0).count() as f64;
            for (&c, &w) in counts.iter().zip(weights) {
                let ideal = f64::from(m) * f64::from(w) / total;
                // Turns through round r are floor(r * w / w_max), so the fill ends within one
                // round of the ideal: |count - ideal| < 2 + N * w / W (proved bound; measured
                // deviations are at most 1 slot).
                let bound = 2.0 + n * f64::from(w) / total;
                assert!(
                    (f64::from(c) - ideal).abs() < bound,
                    "weights {weights:?}: {counts:?}"
                );
                if w == 0 {
                    assert_eq!(c, 0);
                }
                if ideal >= 200.0 {
                    assert!((f64::from(c) - ideal).abs() <= 0.01 * ideal);
                }
            }
        }
    }

    /// Maglev moves the removed backend's slots plus a few more: the fill order changes, so some
    /// contested slots go to a different survivor. The excess grows with N/M (hence the paper's
    /// advice M >= 100 N). Measured here (seed 0x5eed), as a multiple of the ideal 1/N (remove)
    /// or 1/(N+1) (add); over seeds 0..10 the worst case was at most 7% above these:
    ///   M=16381: N=4 1.004 / 1.007, N=10 1.056 / 1.060, N=100 2.39 / 2.43
    ///   M=65537: N=100 1.53 / 1.56   (M=131071, N=1000, ignored test below: 6.2-7)
    /// The bounds leave >= 10% headroom over the worst seen; `hash % N` moves (N-1)/N and fails
    /// every one of them.
    #[test]
    fn removing_or_adding_a_backend_moves_few_slots() {
        for (m, n, max_ratio) in [
            (DEFAULT_TABLE_SIZE, 4u32, 1.15),
            (DEFAULT_TABLE_SIZE, 10, 1.2),
            (DEFAULT_TABLE_SIZE, 100, 2.75),
            (65537, 100, 1.85),
        ] {
            let all = equal(n + 1, 1);
            let before = &all[..n as usize];
            let base = ids(before, SEED, m);

            // Remove the middle backend: at least its own slots move.
            let removed = before[n as usize / 2].id;
            let fewer: Vec<_> = before.iter().copied().filter(|b| b.id != removed).collect();
            let ratio = disruption(&base, &ids(&fewer, SEED, m)) * f64::from(n);
            assert!(
                (1.0..=max_ratio).contains(&ratio),
                "remove m={m} n={n}: {ratio}"
            );

            // Add a backend: it takes about its share, 1/(N+1).
            let ratio = disruption(&base, &ids(&all, SEED, m)) * f64::from(n + 1);
            assert!(
                (0.95..=max_ratio).contains(&ratio),
                "add m={m} n={n}: {ratio}"
            );

            // The bound is meaningful: modulo hashing far exceeds it.
            let modulo =
                |k: u32| -> Vec<u64> { (0..m).map(|s| all[(s % k) as usize].id).collect() };
            let ratio = disruption(&modulo(n), &modulo(n + 1)) * f64::from(n + 1);
            assert!(ratio > 2.0 * max_ratio, "modulo m={m} n={n}: {ratio}");
        }
    }

    /// Weighted backends (weights 1..=5, N = 10, M = 16381). Measured over seeds 0..5: removing a
    /// backend moves 1.07-1.13 x its weight share (weight 1) and 1.02-1.04 x (weight 5); raising
    /// one weight 3 -> 4 moves 0.032 of the slots (ideal share change 4/31 - 3/30 = 0.029).
    #[test]
    fn weighted_changes_move_few_slots() {
        let m = DEFAULT_TABLE_SIZE;
        let mut backends = equal(10, 1);
        for (i, b) in backends.iter_mut().enumerate() {
            b.weight = 1 + i as u32 % 5;
        }
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        let base = ids(&backends, SEED, m);
        for k in [0, 4] {
            let fewer: Vec<_> = backends
                .iter()
                .copied()
                .filter(|b| b.id != backends[k].id)
                .collect();
            let share = f64::from(backends[k].weight) / f64::from(total);
            let ratio = disruption(&base, &ids(&fewer, SEED, m)) / share;
            assert!((1.0..=1.25).contains(&ratio), "remove #{k}: {ratio}");
        }
        let mut heavier = backends.clone();
        heavier[2].weight = 4;
        let moved = disruption(&base, &ids(&heavier, SEED, m));
        assert!((0.029..=0.04).contains(&moved), "{moved}");
    }

    /// The paper's pseudocode with Katran's weighted turns, materialising the permutations, as an
    /// independent reference. `sorted` must be sorted by id.
    fn reference_table(sorted: &[MaglevBackend], m: u32, seed: u64) -> Vec<u64> {
        let m = m as usize;
        let permutations: Vec<Vec<usize>> = sorted
            .iter()
            .map(|b| {
                let offset = (siphash24(seed, OFFSET_KEY, b.id) % m as u64) as usize;
                let skip = (siphash24(seed, SKIP_KEY, b.id) % (m as u64 - 1)) as usize + 1;
                (0..m).map(|j| (offset + j * skip) % m).collect()
            })
            .collect();
        let max_weight = sorted.iter().map(|b| u64::from(b.weight)).max().unwrap();
        let mut credit = vec![0u64; sorted.len()];
        let mut next = vec![0usize; sorted.len()];
        let mut entry: Vec<Option<u64>> = vec![None; m];
        let mut filled = 0;
        loop {
            for (i, b) in sorted.iter().enumerate() {
                credit[i] += u64::from(b.weight);
                if credit[i] < max_weight {
                    continue;
                }
                credit[i] -= max_weight;
                let mut c = permutations[i][next[i]];
                while entry[c].is_some() {
                    next[i] += 1;
                    c = permutations[i][next[i]];
                }
                entry[c] = Some(b.id);
                next[i] += 1;
                filled += 1;
                if filled == m {
                    return entry.into_iter().map(Option::unwrap).collect();
                }
            }
        }
    }

    #[test]
    fn matches_reference_implementation() {
        let cases: [&[u32]; 5] = [
            &[1],
            &[1, 1, 1, 1, 1, 1, 1],
            &[1, 2, 3, 4],
            &[5, 0, 3, 3, 1, 8, 2, 0, 1],
            &[u32::MAX, 1, u32::MAX / 3, 2],
        ];
        let mut rng = Rng(3);
        for (seed, weights) in cases.into_iter().enumerate() {
            let mut backends = equal(weights.len() as u32, 1);
            for (b, &w) in backends.iter_mut().zip(weights) {
                b.weight = w;
            }
            for m in [MIN_TABLE_SIZE, 1021] {
                let expected = reference_table(&backends, m, seed as u64);
                let mut shuffled = backends.clone();
                rng.shuffle(&mut shuffled);
                assert_eq!(
                    ids(&shuffled, seed as u64, m),
                    expected,
                    "{weights:?} m={m}"
                );
            }
        }
    }

    #[test]
    fn draining_a_backend_moves_only_its_slots() {
        let m = DEFAULT_TABLE_SIZE;
        let mut backends = equal(10, 1);
        let base = ids(&backends, SEED, m);
        backends[3].weight = 0;
        let drained = ids(&backends, SEED, m);
        // Weight 0 is the same as removal.
        let mut removed = backends.clone();
        removed.remove(3);
        assert_eq!(drained, ids(&removed, SEED, m));
        assert!(!drained.contains(&backends[3].id));
        assert!(disruption(&base, &drained) <= 0.1 * 1.1 + 0.01);
    }

    #[test]
    fn deterministic_and_independent_of_input_order() {
        let m = DEFAULT_TABLE_SIZE;
        let mut backends = equal(50, 1);
        for (i, b) in backends.iter_mut().enumerate() {
            b.weight = 1 + (i as u32 % 5);
        }
        let first = build_table(&backends, m, SEED).unwrap();
        assert_eq!(first, build_table(&backends, m, SEED).unwrap());
        let first_ids = owner_ids(&first, &backends);

        let mut rng = Rng(42);
        for _ in 0..5 {
            let mut shuffled = backends.clone();
            rng.shuffle(&mut shuffled);
            let table = build_table(&shuffled, m, SEED).unwrap();
            // Indexes refer to the caller's (shuffled) slice; the owners are the same.
            assert_eq!(owner_ids(&table, &shuffled), first_ids);
        }

        // Another seed gives an unrelated table: about (N-1)/N of the slots differ.
        let other = ids(&backends, SEED + 1, m);
        assert!(disruption(&first_ids, &other) > 0.8);
    }

    /// Pins the exact output so that any change to the hash or the fill order, which would make
    /// nodes running different versions disagree, is noticed.
    #[test]
    fn output_is_pinned() {
        let backends = [
            MaglevBackend { id: 3, weight: 1 },
            MaglevBackend { id: 1, weight: 2 },
            MaglevBackend { id: 2, weight: 1 },
        ];
        let table = build_table(&backends, MIN_TABLE_SIZE, 0).unwrap();
        assert_eq!(slot_counts(&table, 3), [62, 126, 63]);
        assert_eq!(&table[..24], PINNED_PREFIX);

        // And a fingerprint (FNV-1a) of a full-size weighted table.
        let mut backends = equal(20, 1);
        for (i, b) in backends.iter_mut().enumerate() {
            b.weight = 1 + i as u32 % 3;
        }
        let fnv = build_table(&backends, DEFAULT_TABLE_SIZE, SEED)
            .unwrap()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
                (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
            });
        assert_eq!(fnv, 0xe3d2_9998_e6f7_6f0b);
    }

    const PINNED_PREFIX: &[u32] = &[
        0, 2, 1, 2, 2, 0, 2, 1, 1, 0, 0, 1, 2, 0, 1, 2, 1, 0, 2, 1, 2, 2, 0, 2,
    ];

    #[test]
    fn table_sizes_are_validated() {
        for bad in [0, 1, 2, 250, 16380, 65535, 131073, 131101, u32::MAX] {
            assert!(validate_table_size(bad).is_err(), "{bad}");
        }
        assert_eq!(
            validate_table_size(250),
            Err(MaglevError::TableSizeOutOfRange(250))
        );
        assert_eq!(
            validate_table_size(131073),
            Err(MaglevError::TableSizeOutOfRange(131073))
        );
        assert_eq!(
            validate_table_size(16380),
            Err(MaglevError::TableSizeNotPrime(16380))
        );
        assert_eq!(
            validate_table_size(65535),
            Err(MaglevError::TableSizeNotPrime(65535))
        );
        for good in [251, 257, 16381, 65521, 65537, 131071] {
            assert_eq!(validate_table_size(good), Ok(()), "{good}");
        }
        assert_eq!(
            MaglevError::TableSizeNotPrime(16380).to_string(),
            "maglev table size 16380 is not prime"
        );
        assert_eq!(
            MaglevError::TableSizeOutOfRange(250).to_string(),
            "maglev table size 250 is out of range: it must be a prime between 251 and 131071"
        );
    }

    #[test]
    fn bad_inputs_do_not_panic() {
        let backends = equal(3, 1);
        assert_eq!(
            build_table(&backends, 16380, SEED),
            Err(MaglevError::TableSizeNotPrime(16380))
        );
        assert_eq!(
            build_table(&backends, 100, SEED),
            Err(MaglevError::TableSizeOutOfRange(100))
        );
        assert_eq!(build_table(&[], DEFAULT_TABLE_SIZE, SEED), Ok(vec![]));
        assert_eq!(
            build_table(&equal(3, 0), DEFAULT_TABLE_SIZE, SEED),
            Ok(vec![])
        );
        let dup = [
            MaglevBackend { id: 9, weight: 1 },
            MaglevBackend { id: 9, weight: 0 },
        ];
        assert_eq!(
            build_table(&dup, DEFAULT_TABLE_SIZE, SEED),
            Err(MaglevError::DuplicateBackendId(9))
        );
        // More backends than slots: the table is still full, some backends get nothing.
        let many = equal(300, 1);
        let table = build_table(&many, MIN_TABLE_SIZE, SEED).unwrap();
        assert_eq!(table.len(), MIN_TABLE_SIZE as usize);
        assert!(slot_counts(&table, many.len()).iter().all(|&c| c <= 1));
    }

    #[test]
    fn helpers() {
        assert_eq!(backend_id(Ipv4Addr::new(10, 0, 0, 1), 80), 0x0a00_0001_0050);
        assert_eq!(slot_counts(&[0, 1, 1, 5], 2), [1, 2]);
        assert_eq!(disruption(&[], &[]), 0.0);
        assert_eq!(disruption(&[1, 2], &[1]), 1.0);
        assert_eq!(disruption(&[1, 2, 3, 4], &[1, 2, 4, 4]), 0.25);
    }

    /// Release-mode timing: `cargo test -p lb-agent --release maglev -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn large_table_builds_fast() {
        let m = MAX_TABLE_SIZE;
        let mut backends = equal(1000, 1);
        let start = std::time::Instant::now();
        let table = build_table(&backends, m, SEED).unwrap();
        let equal_time = start.elapsed();
        assert_eq!(table.len(), m as usize);

        // Disruption at scale: remove one of the 1000.
        let before = owner_ids(&table, &backends);
        let fewer: Vec<_> = backends[1..].to_vec();
        let moved = disruption(&before, &ids(&fewer, SEED, m));

        // Skewed weights: the heavy backend takes a turn in almost every round.
        backends[0].weight = 100_000;
        let start = std::time::Instant::now();
        let table = build_table(&backends, m, SEED).unwrap();
        let skewed_time = start.elapsed();
        assert!(slot_counts(&table, backends.len())[0] > m * 9 / 10);

        println!(
            "M={m} N=1000: build {equal_time:?} (equal weights), {skewed_time:?} (skewed); \
             removing one backend moved {moved:.5} (ideal 0.001, {:.2}x)",
            moved * 1000.0
        );
        if !cfg!(debug_assertions) {
            assert!(equal_time.as_millis() < 500 && skewed_time.as_millis() < 500);
        }
    }
}
