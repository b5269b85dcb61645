#!/usr/bin/env python3
"""Peers for the masquerade tests, run inside lab namespaces (stdlib only).

  peer-server PORT            TCP and UDP on PORT: answer every connection/datagram with the
                              source address:port the server saw, then echo.
  udp-flows HOST PORT N       open N UDP sockets at once, send one datagram each, count answers.
  tcp-hold HOST PORT BIND S   connect from local port BIND (0: any), print the answer, hold S s.
  icmp-too-big TO QSRC QDST QSPORT QDPORT MTU
                              send an ICMP frag-needed to TO quoting a UDP packet QSRC:QSPORT ->
                              QDST:QDPORT (what a router on the path would send).
  icmp-listen SECONDS         print the first ICMP destination-unreachable received as
                              "type code quoted_src quoted_sport checksum_ok".
  peer-server6 PORT           peer-server over IPv6: answers "[address]:port".
  udp-refused HOST PORT       connected UDP socket to HOST:PORT (a closed port): print "refused"
                              when the ICMP(v6) port unreachable reaches the socket, else
                              "no-error".
  udp-mtu HOST PORT SECONDS   connected UDP socket: print the server's answer, hold SECONDS, then
                              print "mtu N", the path MTU the kernel holds for the socket.
  icmp6-too-big TO QSRC QDST QSPORT QDPORT MTU
                              send an ICMPv6 Packet Too Big to TO quoting a UDP packet
                              [QSRC]:QSPORT -> [QDST]:QDPORT (the kernel fills the checksum).

HOST may be an IPv4 or an IPv6 address everywhere.
"""
import select
import socket
import struct
import sys
import threading
import time


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def seen(peer):
    if len(peer) == 4:  # IPv6: (host, port, flowinfo, scope)
        return "[%s]:%d" % peer[:2]
    return "%s:%d" % peer


def peer_server(port, fam=socket.AF_INET):
    anywhere = "::" if fam == socket.AF_INET6 else "0.0.0.0"
    tcp = socket.socket(fam, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((anywhere, port))
    tcp.listen(512)
    udp = socket.socket(fam, socket.SOCK_DGRAM)
    # Bursts of a thousand flows: a default receive buffer holds a few hundred datagrams.
    udp.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
    udp.bind((anywhere, port))

    def serve(conn, peer):
        with conn:
            conn.sendall((seen(peer) + "\n").encode())
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                conn.sendall(data)

    def tcp_loop():
        while True:
            conn, peer = tcp.accept()
            threading.Thread(target=serve, args=(conn, peer), daemon=True).start()

    threading.Thread(target=tcp_loop, daemon=True).start()
    print("ready", flush=True)
    while True:
        data, peer = udp.recvfrom(4096)
        udp.sendto(seen(peer).encode(), peer)


def udp_flows(host, port, n):
    """N concurrent flows (one socket each, all open at once); like any UDP application, a
    flow whose datagram or answer was lost sends again, up to a deadline."""
    socks = []
    for _ in range(n):
        s = socket.socket(family(host), socket.SOCK_DGRAM)
        s.setblocking(False)
        socks.append(s)
    answered = set()
    deadline = time.time() + 15
    while len(answered) < n and time.time() < deadline:
        for s in socks:
            if s not in answered:
                s.sendto(b"hello", (host, port))
        resend_at = time.time() + 1.0
        while len(answered) < n and time.time() < resend_at:
            ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.2)
            for s in ready:
                try:
                    s.recv(100)
                    answered.add(s)
                except BlockingIOError:
                    pass
    print(len(answered))


def tcp_hold(host, port, bind, seconds):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if bind:
        s.bind(("::" if family(host) == socket.AF_INET6 else "0.0.0.0", bind))
    s.settimeout(5)
    s.connect((host, port))
    line = s.makefile().readline().strip()
    s.sendall(b"ping\n")
    echo = s.recv(100)
    print(line, "echo-ok" if echo == b"ping\n" else "echo-bad", flush=True)
    time.sleep(seconds)
    s.close()


def icmp_too_big(to, qsrc, qdst, qsport, qdport, mtu):
    udp = struct.pack("!HHHH", qsport, qdport, 8 + 100, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 100, 1, 0x4000, 64, 17, 0,
                     socket.inet_aton(qsrc), socket.inet_aton(qdst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    body = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + ip + udp
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.sendto(body, (to, 0))


def icmp_listen(seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(seconds)
    # The caller waits for this line before it has the error sent.
    print("listening", file=sys.stderr, flush=True)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            pkt = s.recv(2048)
        except socket.timeout:
            break
        ihl = (pkt[0] & 0x0F) * 4
        icmp = pkt[ihl:]
        if icmp[0] != 3:
            continue
        quoted = icmp[8:]
        qsrc = socket.inet_ntoa(quoted[12:16])
        qsport = struct.unpack("!H", quoted[20:22])[0]
        print(icmp[0], icmp[1], qsrc, qsport, "checksum_ok" if checksum(icmp) == 0 else "checksum_bad", flush=True)
        return
    print("none", flush=True)


def udp_refused(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(1)
    for _ in range(5):
        try:
            s.send(b"anyone?")
            s.recv(100)
        except ConnectionRefusedError:
            print("refused", flush=True)
            return
        except socket.timeout:
            continue
    print("no-error", flush=True)


def udp_mtu(host, port, seconds):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(1)
    answer = None
    for _ in range(5):
        s.send(b"hello")
        try:
            answer = s.recv(100).decode()
            break
        except socket.timeout:
            continue
    print(answer, flush=True)
    time.sleep(seconds)
    ipv6_mtu = getattr(socket, "IPV6_MTU", 24)  # <netinet/in.h>; not in every Python
    print("mtu", s.getsockopt(socket.IPPROTO_IPV6, ipv6_mtu), flush=True)


def icmp6_too_big(to, qsrc, qdst, qsport, qdport, mtu):
    udp = struct.pack("!HHHH", qsport, qdport, 8 + 100, 0) + b"\0" * 100
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64,
                     socket.inet_pton(socket.AF_INET6, qsrc), socket.inet_pton(socket.AF_INET6, qdst))
    body = struct.pack("!BBHI", 2, 0, 0, mtu) + ip + udp
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.sendto(body, (to, 0))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "peer-server":
        peer_server(int(args[0]))
    elif cmd == "udp-flows":
        udp_flows(args[0], int(args[1]), int(args[2]))
    elif cmd == "tcp-hold":
        tcp_hold(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif cmd == "icmp-too-big":
        icmp_too_big(args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5]))
    elif cmd == "icmp-listen":
        icmp_listen(float(args[0]))
    elif cmd == "peer-server6":
        peer_server(int(args[0]), socket.AF_INET6)
    elif cmd == "udp-refused":
        udp_refused(args[0], int(args[1]))
    elif cmd == "udp-mtu":
        udp_mtu(args[0], int(args[1]), float(args[2]))
    elif cmd == "icmp6-too-big":
        icmp6_too_big(args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5]))
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
