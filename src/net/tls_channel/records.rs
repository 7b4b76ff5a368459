//! The TLS 1.3 record layer of a data channel after rustls's handshake (RFC
//! 8446 §5): each direction's key, IV and sequence number, sealing in place
//! into the buffer that goes to the socket, opening in place in the buffer
//! that came from it, and moving to new keys. What the records carry (data,
//! alerts, post-handshake messages) is the channel's business (`super`).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, InvalidMessage, PeerMisbehaved};

/// Largest TLS 1.3 record body on the wire (RFC 8446 §5.2): 16 KiB of
/// plaintext, its content type, the AEAD tag and padding allowance.
pub(super) const MAX_CIPHERTEXT: usize = 16 * 1024 + 256;
/// A record's header: content type, legacy version, length.
pub(super) const HEADER: usize = 5;
/// Largest plaintext per record.
pub(super) const MAX_FRAGMENT: usize = 16 * 1024;
/// The AEAD tag every suite here appends (AES-GCM and ChaCha20-Poly1305).
const TAG: usize = 16;
/// What a record adds to its plaintext: header, inner content type, tag.
const RECORD_OVERHEAD: usize = HEADER + 1 + TAG;

/// Content types (RFC 8446 §5.1): the outer one of every protected record is
/// application data; the inner one, behind the plaintext, says what it is.
pub(super) const ALERT: u8 = 21;
pub(super) const HANDSHAKE: u8 = 22;
pub(super) const APPLICATION_DATA: u8 = 23;
/// A KeyUpdate saying "update_not_requested": what this end sends with its new keys.
const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [super::KEY_UPDATE, 0, 0, 1, 0];

/// rustls's side of the session after the handshake: new traffic secrets on a
/// key update, and (for a client) the session tickets.
pub(super) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx_secret(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    pub(super) fn update_rx_secret(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn confidentiality_limit(&self) -> Option<u64> {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        suite.tls13().map(|s| s.common.confidentiality_limit)
    }
}

/// One direction's AEAD key, IV and sequence number.
pub(super) struct Protection {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Protection {
    pub(super) fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Protection, rustls::Error> {
        let (algorithm, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(rustls::Error::General("a TLS 1.2 cipher suite on a data channel".into())),
        };
        let key = UnboundKey::new(algorithm, key.as_ref()).map_err(|_| rustls::Error::General("unusable traffic key".into()))?;
        let iv = iv.as_ref().try_into().map_err(|_| rustls::Error::General("unusable traffic IV".into()))?;
        Ok(Protection { key: LessSafeKey::new(key), iv, seq })
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446 §5.3).
    fn nonce(&self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        Nonce::assume_unique_for_key(nonce)
    }

    /// Appends `payload` as one record of inner type `content_type` to `out`,
    /// sealed in place: the payload's only copy.
    pub(super) fn seal(&mut self, out: &mut Vec<u8>, content_type: u8, payload: &[u8]) -> Result<(), rustls::Error> {
        let start = out.len();
        let header = record_header(payload.len() + 1 + TAG);
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        out.push(content_type);
        let tag = self.key.seal_in_place_separate_tag(self.nonce(), Aad::from(header), &mut out[start + HEADER..]);
        out.extend_from_slice(tag.map_err(|_| rustls::Error::EncryptError)?.as_ref());
        self.seq += 1;
        Ok(())
    }

    /// Opens the whole record `record` in place: its inner content type and
    /// where its content lies in `record`.
    pub(super) fn open(&mut self, record: &mut [u8]) -> Result<(u8, usize), rustls::Error> {
        let (header, body) = record.split_at_mut(HEADER);
        let aad = Aad::from([header[0], header[1], header[2], header[3], header[4]]);
        let plain = self.key.open_in_place(self.nonce(), aad, body).map_err(|_| rustls::Error::DecryptError)?;
        self.seq += 1;
        // The content type is the last byte that is not padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(rustls::Error::PeerMisbehaved(PeerMisbehaved::IllegalTlsInnerPlaintext));
        };
        if end > MAX_FRAGMENT {
            return Err(rustls::Error::PeerSentOversizedRecord);
        }
        Ok((plain[end], end))
    }
}

fn record_header(body: usize) -> [u8; HEADER] {
    let [hi, lo] = (body as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, hi, lo]
}

/// The record layer after the handshake: both directions' protection and
/// rustls's kernel connection.
pub(super) struct Records {
    pub(super) kernel: Kernel,
    pub(super) tx: Protection,
    pub(super) rx: Protection,
    /// Records one send key may seal (the suite's confidentiality limit):
    /// before that, this end moves to new keys.
    pub(super) tx_limit: u64,
}

impl Records {
    pub(super) fn new(secrets: ExtractedSecrets, kernel: Kernel) -> Result<Records, rustls::Error> {
        let tx_limit = kernel.confidentiality_limit().ok_or_else(|| rustls::Error::General("not TLS 1.3".into()))?;
        Ok(Records { tx: Protection::new(secrets.tx)?, rx: Protection::new(secrets.rx)?, kernel, tx_limit })
    }

    /// Appends `data` to `out` as records of at most 16 KiB, moving to new
    /// keys first where the current ones reach their limit.
    pub(super) fn seal_data(&mut self, out: &mut Vec<u8>, data: &[u8]) -> Result<(), rustls::Error> {
        out.reserve(data.len() + data.len().div_ceil(MAX_FRAGMENT) * RECORD_OVERHEAD);
        for fragment in data.chunks(MAX_FRAGMENT) {
            if self.tx.seq + 1 >= self.tx_limit {
                self.update_tx(out)?;
            }
            self.tx.seal(out, APPLICATION_DATA, fragment)?;
        }
        Ok(())
    }

    /// Tells the peer (under the old keys) that this end moves to new ones, then does.
    pub(super) fn update_tx(&mut self, out: &mut Vec<u8>) -> Result<(), rustls::Error> {
        self.tx.seal(out, HANDSHAKE, &KEY_UPDATE_NOT_REQUESTED)?;
        self.tx = Protection::new(self.kernel.update_tx_secret()?)?;
        Ok(())
    }
}

/// The length of the whole record at the front of `input`, `None` while it is
/// not all there.
pub(super) fn whole_record(input: &[u8]) -> Result<Option<usize>, rustls::Error> {
    let Some(header) = input.get(..HEADER) else {
        return Ok(None);
    };
    if header[0] != APPLICATION_DATA {
        return Err(rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType));
    }
    let body = u16::from_be_bytes([header[3], header[4]]) as usize;
    if body > MAX_CIPHERTEXT {
        return Err(rustls::Error::PeerSentOversizedRecord);
    }
    Ok((input.len() >= HEADER + body).then_some(HEADER + body))
}
