#!/usr/bin/env python3
"""An SRTP leg of a SIPREC session, encrypted by libsrtp (pylibsrtp from PyPI): the
independent SRTP sender of tests/it/siprec.rs (the recorder decrypts with webrtc-rs's
rtc-srtp). Sends PACKETS PCMU packets of a fixed pattern to 127.0.0.1:PORT, keyed with the
SDES master key and salt KEY (base64) of SUITE (80 or 32), then one forged packet (its last
payload byte flipped), which must not be recorded.

Payload of packet `seq`: byte i is (i + seq) % 0x70, as the test expects.
"""
import argparse
import base64
import socket
import struct

import pylibsrtp

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--key", required=True)
p.add_argument("--suite", choices=["80", "32"], required=True)
p.add_argument("--packets", type=int, default=50)
p.add_argument("--ssrc", type=lambda s: int(s, 0), default=0x5EC0)
a = p.parse_args()

profile = {
    "80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}[a.suite]
policy = pylibsrtp.Policy(
    key=base64.b64decode(a.key),
    ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
    srtp_profile=profile,
)
session = pylibsrtp.Session(policy)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
last = b""
for seq in range(a.packets):
    header = struct.pack("!BBHII", 0x80, 0, seq, seq * 160, a.ssrc)
    payload = bytes((i + seq) % 0x70 for i in range(160))
    last = session.protect(header + payload)
    sock.sendto(last, ("127.0.0.1", a.port))
# A forged packet: the next sequence number, its authentication tag no longer matching.
header = struct.pack("!BBHII", 0x80, 0, a.packets, a.packets * 160, a.ssrc)
forged = bytearray(session.protect(header + bytes(160)))
forged[12] ^= 0x01
sock.sendto(bytes(forged), ("127.0.0.1", a.port))
