"""Sets up calls on rtpengine over its ng control protocol (bencode over UDP), with
recording on, for benches/rtpengine_load.sh: prints the media ports rtpengine allocated
(the two legs of each call, in order, comma-separated) and then holds the two sink ports
its SDP names (bound, never read, so no "port unreachable" comes back) until killed.
    python3 benches/rtpengine_ng.py CALLS NG_PORT SINK_PORT
"""
import random
import socket
import sys
import time


def benc(x):
    if isinstance(x, int):
        return b"i%de" % x
    if isinstance(x, str):
        x = x.encode()
    if isinstance(x, bytes):
        return b"%d:%s" % (len(x), x)
    if isinstance(x, list):
        return b"l" + b"".join(benc(i) for i in x) + b"e"
    return b"d" + b"".join(benc(k) + benc(v) for k, v in sorted(x.items())) + b"e"


def bdec(s, i=0):
    c = s[i:i + 1]
    if c == b"i":
        j = s.index(b"e", i)
        return int(s[i + 1:j]), j + 1
    if c in (b"l", b"d"):
        i += 1
        items = []
        while s[i:i + 1] != b"e":
            v, i = bdec(s, i)
            items.append(v)
        if c == b"l":
            return items, i + 1
        return {items[k].decode(): items[k + 1] for k in range(0, len(items), 2)}, i + 1
    j = s.index(b":", i)
    n = int(s[i:j])
    return s[j + 1:j + 1 + n], j + 1 + n


def main():
    calls, ng_port, sink = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    sinks = []
    for p in (sink, sink + 2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", p))
        sinks.append(s)
    ng = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ng.settimeout(5)

    def command(cmd):
        cookie = b"%d" % random.randrange(1 << 30)
        ng.sendto(cookie + b" " + benc(cmd), ("127.0.0.1", ng_port))
        reply = bdec(ng.recv(65535).split(b" ", 1)[1])[0]
        if reply.get("result") != b"ok":
            sys.exit("rtpengine: %r" % reply)
        return reply

    def sdp(port):
        return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                "m=audio %d RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n" % port)

    def port_of(body):
        for line in body.decode().split("\r\n"):
            if line.startswith("m=audio"):
                return int(line.split()[1])
        sys.exit("rtpengine: no m=audio in %r" % body)

    ports = []
    for c in range(calls):
        cid, a, b = "call-%d" % c, "a%d" % c, "b%d" % c
        offer = command({"command": "offer", "call-id": cid, "from-tag": a, "sdp": sdp(sink),
                         "record call": "yes"})
        answer = command({"command": "answer", "call-id": cid, "from-tag": a, "to-tag": b,
                          "sdp": sdp(sink + 2), "record call": "yes"})
        # The caller sends to what the answer names, the callee to what the offer names.
        ports += [port_of(answer["sdp"]), port_of(offer["sdp"])]
    print(",".join(str(p) for p in ports), flush=True)
    while True:
        time.sleep(3600)


main()
