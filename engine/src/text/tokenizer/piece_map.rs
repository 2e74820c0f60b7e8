//! Piece text → token id, built once at load. Gemma's vocabulary has 262,144 pieces and
//! the SentencePiece merge loop looks up every candidate bigram, so lookups take a byte
//! slice (no `String` per probe) and hash it with a cheap multiplicative hash.

/// An open-addressing hash table from piece bytes to token id; the bytes themselves stay
/// in the vocabulary, which every lookup is given.
pub(crate) struct PieceMap {
    /// `id + 1` per slot, 0 for an empty slot.
    slots: Vec<u32>,
    /// `64 - log2(slots.len())`: the hash's top bits pick the slot.
    shift: u32,
}

/// Hashes a piece: 8 bytes at a time, rotate-xor-multiply (FxHash's scheme), length mixed in.
fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(buf)).wrapping_mul(K);
    }
    // The top bits select the slot; fold the low bits up so short keys spread too.
    h ^ (h >> 29)
}

impl PieceMap {
    /// Builds the map over `pieces`; on a duplicate, returns the two ids holding it.
    pub(crate) fn build(pieces: &[String]) -> Result<PieceMap, (u32, u32)> {
        let cap = (pieces.len().max(4) * 2).next_power_of_two();
        let mut map = PieceMap {
            slots: vec![0; cap],
            shift: 64 - cap.trailing_zeros(),
        };
        let mask = cap - 1;
        for (id, p) in pieces.iter().enumerate() {
            let mut i = map.slot(p.as_bytes());
            loop {
                match map.slots[i] {
                    0 => {
                        map.slots[i] = id as u32 + 1;
                        break;
                    }
                    s if pieces[s as usize - 1] == *p => return Err((s - 1, id as u32)),
                    _ => i = (i + 1) & mask,
                }
            }
        }
        Ok(map)
    }

    fn slot(&self, bytes: &[u8]) -> usize {
        (hash(bytes) >> self.shift) as usize
    }

    /// The id of the piece spelled by `bytes`, if any; `pieces` is what the map was built on.
    #[inline]
    pub(crate) fn get(&self, pieces: &[String], bytes: &[u8]) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = self.slot(bytes);
        loop {
            match self.slots[i] {
                0 => return None,
                s if pieces[s as usize - 1].as_bytes() == bytes => return Some(s - 1),
                _ => i = (i + 1) & mask,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_piece_and_nothing_else() {
        let pieces: Vec<String> = (0..5000).map(|i| format!("▁p{i}")).collect();
        let map = PieceMap::build(&pieces).unwrap();
        for (i, p) in pieces.iter().enumerate() {
            assert_eq!(map.get(&pieces, p.as_bytes()), Some(i as u32), "{p}");
        }
        for miss in ["", "▁p5000", "p1", "▁p"] {
            assert_eq!(map.get(&pieces, miss.as_bytes()), None, "{miss}");
        }
    }

    #[test]
    fn a_duplicate_piece_names_both_ids() {
        let pieces: Vec<String> = ["a", "b", "a"].map(String::from).to_vec();
        assert_eq!(PieceMap::build(&pieces).err(), Some((0, 2)));
    }
}
