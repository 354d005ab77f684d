//! A writer for the `newc` cpio format the Linux kernel unpacks as an initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes; the archive ends
//! with an entry named `TRAILER!!!`.

use std::io::{self, Write};

/// File type bits of `st_mode`.
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// Writes a newc archive entry by entry; call [`finish`](Self::finish) at the end.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
}

/// The header fields of one entry that vary.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    size: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

fn too_large(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} too large for cpio newc"),
    )
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive written to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_inode: 1,
        }
    }

    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }

    fn write_header(&mut self, header: &Header<'_>) -> io::Result<()> {
        let name = header.name.trim_start_matches('/');
        let name_size = u32::try_from(name.len() + 1).map_err(|_| too_large("name"))?;
        let inode = self.next_inode;
        self.next_inode += 1;
        let fields = [
            inode,
            header.mode,
            0, // uid
            0, // gid
            header.nlink,
            0, // mtime
            header.size,
            0, // dev major
            0, // dev minor
            header.rdev_major,
            header.rdev_minor,
            name_size,
            0, // check
        ];
        let mut text = String::with_capacity(110);
        text.push_str(MAGIC);
        for field in fields {
            text.push_str(&format!("{field:08x}"));
        }
        self.out.write_all(text.as_bytes())?;
        self.written += text.len() as u64;
        let mut name_bytes = name.as_bytes().to_vec();
        name_bytes.push(0);
        self.write_padded(&name_bytes)
    }

    /// Adds a directory (its parents must have been added before).
    pub fn directory(&mut self, path: &str, permissions: u32) -> io::Result<()> {
        self.write_header(&Header {
            name: path,
            mode: S_IFDIR | (permissions & 0o7777),
            nlink: 2,
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        })
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, path: &str, permissions: u32, contents: &[u8]) -> io::Result<()> {
        let size = u32::try_from(contents.len()).map_err(|_| too_large(path))?;
        self.write_header(&Header {
            name: path,
            mode: S_IFREG | (permissions & 0o7777),
            nlink: 1,
            size,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        self.write_padded(contents)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let size = u32::try_from(target.len()).map_err(|_| too_large(path))?;
        self.write_header(&Header {
            name: path,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            size,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        self.write_padded(target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(
        &mut self,
        path: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        self.write_header(&Header {
            name: path,
            mode: S_IFCHR | (permissions & 0o7777),
            nlink: 1,
            size: 0,
            rdev_major: major,
            rdev_minor: minor,
        })
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_header(&Header {
            name: TRAILER,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        })?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One parsed entry: (name, mode, rdev major, rdev minor, data).
    type Entry = (String, u32, u32, u32, Vec<u8>);

    fn hex_field(bytes: &[u8], index: usize) -> u32 {
        let start = 6 + index * 8;
        let text = std::str::from_utf8(&bytes[start..start + 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap()
    }

    fn align4(n: usize) -> usize {
        n.div_ceil(4) * 4
    }

    /// A minimal reader, independent of the writer, to check what it wrote.
    fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        loop {
            assert_eq!(&bytes[..6], MAGIC.as_bytes());
            let mode = hex_field(bytes, 1);
            let size = hex_field(bytes, 6) as usize;
            let rmaj = hex_field(bytes, 9);
            let rmin = hex_field(bytes, 10);
            let name_size = hex_field(bytes, 11) as usize;
            let name = std::str::from_utf8(&bytes[110..110 + name_size - 1])
                .unwrap()
                .to_string();
            assert_eq!(bytes[110 + name_size - 1], 0);
            let data_start = align4(110 + name_size);
            let data = bytes[data_start..data_start + size].to_vec();
            bytes = &bytes[align4(data_start + size)..];
            if name == TRAILER {
                assert!(bytes.is_empty());
                return entries;
            }
            entries.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn writes_each_entry_kind() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.directory("/bin", 0o755).unwrap();
        cpio.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        cpio.symlink("/bin/sh", "busybox").unwrap();
        cpio.char_device("/dev/console", 0o600, 5, 1).unwrap();
        let bytes = cpio.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        assert_eq!(
            entries,
            vec![
                ("bin".to_string(), 0o040_755, 0, 0, vec![]),
                ("init".to_string(), 0o100_755, 0, 0, b"#!/bin/sh\n".to_vec()),
                ("bin/sh".to_string(), 0o120_777, 0, 0, b"busybox".to_vec()),
                ("dev/console".to_string(), 0o020_600, 5, 1, vec![]),
            ]
        );
    }

    proptest! {
        #[test]
        fn files_round_trip(files in proptest::collection::vec(
            ("[a-z][a-z0-9_.-]{0,20}", proptest::collection::vec(any::<u8>(), 0..64)), 0..8)
        ) {
            let mut cpio = CpioWriter::new(Vec::new());
            for (name, data) in &files {
                cpio.file(name, 0o644, data).unwrap();
            }
            let bytes = cpio.finish().unwrap();
            prop_assert_eq!(bytes.len() % 4, 0);
            let entries = parse(&bytes);
            prop_assert_eq!(entries.len(), files.len());
            for ((name, data), entry) in files.iter().zip(entries) {
                prop_assert_eq!(&entry.0, name);
                prop_assert_eq!(entry.1, 0o100_644);
                prop_assert_eq!(&entry.4, data);
            }
        }
    }
}
