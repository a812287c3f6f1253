//! FNV-1a: stable across builds and platforms (std's hasher is not), for
//! names and ids that must come out the same on every delivery.

const OFFSET_64: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME_64: u64 = 0x0100_0000_01b3;

/// FNV-1a, 64 bits, fed in parts.
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(OFFSET_64)
    }
}

impl Fnv64 {
    pub fn write(&mut self, bytes: &[u8]) -> &mut Self {
        self.0 = bytes.iter().fold(self.0, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME_64));
        self
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a, 64 bits, of `bytes`.
pub fn fnv64(bytes: &[u8]) -> u64 {
    Fnv64::default().write(bytes).finish()
}

/// FNV-1a, 32 bits, of `bytes`: for a short suffix.
pub fn fnv32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_published_test_vectors() {
        // From the FNV reference: "a" and "foobar".
        assert_eq!(super::fnv32(b"a"), 0xe40c_292c);
        assert_eq!(super::fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::fnv64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(super::Fnv64::default().write(b"foo").write(b"bar").finish(), super::fnv64(b"foobar"));
    }
}
