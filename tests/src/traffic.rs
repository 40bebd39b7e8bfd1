//! Real traffic for namespace tests: a TCP backend server with a small line protocol (and
//! enough HTTP for curl and health checks), a UDP echo server, and client helpers. Everything
//! is bounded in time and in threads, and servers stop when dropped.
//!
//! TCP requests, one line each:
//! - `WHO` -> the server's name and `\n`, then close.
//! - `GET <n>` -> `n` bytes of [`fill_pattern`], then close.
//! - `PUT <n>` -> reads `n` bytes, answers their FNV-1a 64 as 16 hex digits and `\n`.
//! - `ECHO` -> the name and `\n`, then echoes every line until the client closes: a long-lived
//!   flow ([`Session`]).
//! - `GET /<anything> HTTP/1.x` -> `HTTP/1.0 <status>` with the name and `\n` as body
//!   (status 200 unless changed with [`Server::set_http_status`]).
//!
//! UDP: every datagram is answered with `<name>\n<datagram>`.
//!
//! ICMP: [`ping`] sends echo requests over a raw socket and matches each reply.

mod client;
mod ping;
mod server;

use std::{
    io::{self, BufRead as _, Read as _},
    time::Duration,
};

use anyhow::Result;

pub use client::{Session, UdpClient, connect, download, http_get, udp_who, upload, who};
pub use ping::ping;
pub use server::{Server, UdpEcho, VipUdpEcho};

/// Connect and per-read/write timeout of the client helpers.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on a whole GET/PUT transfer.
pub const TRANSFER_DEADLINE: Duration = Duration::from_mins(1);
/// Longest request or reply line.
const MAX_LINE: u64 = 1024;
/// Transfer buffer size.
const CHUNK: usize = 64 * 1024;

/// Writes the deterministic test pattern for stream offsets `offset..offset + buf.len()`:
/// 8-byte blocks of splitmix64(block index), so reordered or duplicated segments are caught.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        *byte = splitmix64(at / 8).to_le_bytes()[(at % 8) as usize];
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bits, fed incrementally.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

/// FNV-1a 64 of the first `n` pattern bytes: what `PUT <n>` must answer for [`upload`].
pub fn pattern_fnv(n: u64) -> u64 {
    let mut fnv = Fnv64::default();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    while done < n {
        let len = (n - done).min(CHUNK as u64) as usize;
        fill_pattern(done, &mut buf[..len]);
        fnv.update(&buf[..len]);
        done += len as u64;
    }
    fnv.finish()
}

/// One request or reply line, without its line ending; at most [`MAX_LINE`] bytes are read.
pub(crate) fn read_line(reader: &mut impl io::BufRead) -> Result<String> {
    let mut line = String::new();
    reader.take(MAX_LINE).read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}
