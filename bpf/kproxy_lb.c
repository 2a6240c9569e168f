/* kproxy eBPF load balancer, compiled at runtime by bcc (see kproxy/dataplane/ebpf/loader.py).
 *
 * Two data paths share one set of maps, pinned in bpffs by the loader:
 *
 *  - Socket-level LB (cgroup v2 sock_addr hooks): connect4/6 and sendmsg4/6 rewrite a Service VIP:port
 *    to a backend before the kernel routes anything, so in-cluster traffic needs no per-packet NAT;
 *    recvmsg4/6 and getpeername4/6 translate the backend back to the VIP (per socket, keyed on the
 *    socket cookie) so applications only ever see the Service address.
 *  - tc (clsact, direct-action) on the node's external interfaces: DNAT of NodePort / externalIP /
 *    LoadBalancer IP traffic arriving from outside, with per-flow state in LRU "conntrack" maps keyed on
 *    the full 5-tuple; the egress program reverses the translation for replies.
 *
 * Only stable UAPI contexts are used (bpf_sock_addr, __sk_buff), so headers of another kernel version
 * are fine.
 *
 * Map layout (mirrored in kproxy/dataplane/ebpf/maps.py MAPS and objfile.py MAP_SPECS: change all three):
 *   kp_svc     (addr, port, proto, kind|family) -> (set id, count, affinity id, affinity timeout, flags)
 *   kp_be      (set id, slot)                   -> backend (addr, port, family, flags)
 *   kp_member  (affinity id, addr, port)        -> backend: "is this backend still in the service"
 *   kp_aff     (client, netns cookie, aff id)   -> backend + last use (sessionAffinity ClientIP)
 *   kp_revsk   (socket cookie, backend)         -> VIP (socket LB reverse translation)
 *   kp_ct_fwd  5-tuple client->VIP              -> backend (tc)
 *   kp_ct_rev  5-tuple backend->client          -> VIP (tc)
 *   kp_nodeaddr node addresses that accept NodePorts
 *   kp_meta    affinity id -> service port name (for `kproxy status`), id 0 -> attachment record
 *   kp_srcrange (affinity id, source prefix) LPM trie: loadBalancerSourceRanges
 *
 * NodePort traffic with externalTrafficPolicy Cluster is source-NATed like kube-proxy does: kp_tc_in
 * sets the masquerade mark and a single nft rule masquerades marked packets on the way out.
 *
 * A service update writes the new backend slots under a fresh set id, then switches the kp_svc entry
 * (one atomic element update) and only then deletes the old slots: a lookup never sees a half-written
 * service.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#define KIND_SOCK 0      /* VIP reached from a socket in the cgroup */
#define KIND_TC 1        /* VIP reached from outside through an external interface */
#define KIND_NODEPORT 2  /* any node address (addr = 0) : nodePort, from outside */
#define KIND_SOCK_NP 3   /* any node address : nodePort, from a socket in the cgroup */
#define KF(kind, fam) ((__u8)(((kind) << 4) | (fam)))

#define NSEC 1000000000ULL
#define CT_TCP_LIFETIME (21600ULL * NSEC)
#define CT_CLOSE_LIFETIME (10ULL * NSEC)
#define CT_UDP_LIFETIME (60ULL * NSEC)
#define CT_FLAG_CLOSING 1
#define CT_FLAG_SNAT 2

#define KP_ECONNREFUSED 111
#define KP_ETIMEDOUT 110
#ifdef KP_SET_RETVAL
/* Linux 5.18+: make connect()/sendmsg() to a Service without endpoints fail with ECONNREFUSED, like
 * kube-proxy's REJECT, instead of the EPERM a plain "return 0" gives. */
static long (*kp_set_retval)(int retval) = (void *)BPF_FUNC_set_retval;
#endif

#define SVC_F_SNAT 0x100 /* tc: masquerade (externalTrafficPolicy Cluster): mark for the nft masquerade rule */
#define SVC_F_SRC_RANGES 0x200 /* tc: only sources in kp_srcrange[aff id] (loadBalancerSourceRanges) */
#define SVC_F_DROP 0x400 /* no endpoint for this traffic's policy but some elsewhere: DROP, not REJECT */
#ifndef KP_MASQ_MARK
#define KP_MASQ_MARK 0x4000
#endif

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define KP_HTONS(x) ((__u16)__builtin_bswap16(x))
#define KP_HTONL(x) ((__u32)__builtin_bswap32(x))
#else
#define KP_HTONS(x) ((__u16)(x))
#define KP_HTONL(x) ((__u32)(x))
#endif

struct svc_key {
    __u32 addr[4];
    __u16 port;   /* network order */
    __u8 proto;
    __u8 kf;      /* kind << 4 | family */
};

struct svc_val {
    __u32 set_id;
    __u32 count;
    __u32 aff_id;
    __u32 aff_timeout; /* seconds, 0 = no session affinity */
    __u32 flags;
};

struct be_key {
    __u32 set_id;
    __u32 slot;
};

struct be_val {
    __u32 addr[4];
    __u16 port;
    __u8 family;
    __u8 flags;
};

struct member_key {
    __u32 aff_id;
    __u32 addr[4];
    __u16 port;
    __u16 pad;
};

struct aff_key {
    __u32 client[4]; /* client address (tc) or 0 (sockets: the netns cookie identifies the pod) */
    __u64 cookie;
    __u32 aff_id;
    __u32 pad;
};

struct aff_val {
    __u32 addr[4];
    __u16 port;
    __u16 pad;
    __u32 pad2;
    __u64 ts;
};

struct revsk_key {
    __u64 cookie;
    __u32 addr[4];
    __u16 port;
    __u8 family;
    __u8 pad;
    __u32 pad2;
};

struct revsk_val {
    __u32 addr[4];
    __u16 port;
    __u16 pad;
};

struct ct_key {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;
    __u16 dport;
    __u8 proto;
    __u8 family;
    __u16 pad;
};

struct ct_val {
    __u32 addr[4];
    __u16 port;
    __u8 flags;
    __u8 pad;
    __u32 aff_id;
    __u64 ts;
};

struct addr_key {
    __u32 addr[4];
    __u32 family;
};

struct meta_val {
    char name[256];
};

struct src_key {
    __u32 prefixlen; /* 32 (the affinity id) + address bits */
    __u32 aff_id;
    __u32 addr[4];
};

/* Map definitions for the compiler only: the loader (objfile.py) creates and pins the real maps with the
 * same layout (MAP_SPECS there) and patches their fds into the bytecode. */
BPF_F_TABLE("hash", struct svc_key, struct svc_val, kp_svc, 131072, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct be_key, struct be_val, kp_be, 524288, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct member_key, struct be_val, kp_member, 524288, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", struct aff_key, struct aff_val, kp_aff, 65536);
BPF_TABLE("lru_hash", struct revsk_key, struct revsk_val, kp_revsk, 65536);
BPF_TABLE("lru_hash", struct ct_key, struct ct_val, kp_ct_fwd, 65536);
BPF_TABLE("lru_hash", struct ct_key, struct ct_val, kp_ct_rev, 65536);
BPF_F_TABLE("hash", struct addr_key, __u32, kp_nodeaddr, 1024, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", __u32, struct meta_val, kp_meta, 131072, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct src_key, __u32, kp_srcrange, 16384, BPF_F_NO_PREALLOC);

/* ---- backend selection ------------------------------------------------------------------------ */

/* Pick a backend of ``sv``: the client's affinity entry if still valid, else a random slot. */
static __always_inline int pick_backend(struct svc_val *sv, struct aff_key *ak, struct be_val *out)
{
    __u64 now = bpf_ktime_get_ns();
    if (sv->aff_timeout) {
        struct aff_val *av = kp_aff.lookup(ak);
        if (av && now - av->ts <= (__u64)sv->aff_timeout * NSEC) {
            struct member_key mk;
            __builtin_memset(&mk, 0, sizeof(mk));
            mk.aff_id = sv->aff_id;
            mk.addr[0] = av->addr[0];
            mk.addr[1] = av->addr[1];
            mk.addr[2] = av->addr[2];
            mk.addr[3] = av->addr[3];
            mk.port = av->port;
            struct be_val *m = kp_member.lookup(&mk);
            if (m) {
                av->ts = now;
                __builtin_memcpy(out, m, sizeof(*out));
                return 0;
            }
        }
    }
    if (sv->count == 0)
        return -1;
    struct be_key bk = {};
    bk.set_id = sv->set_id;
    bk.slot = bpf_get_prandom_u32() % sv->count;
    struct be_val *be = kp_be.lookup(&bk);
    if (!be)
        return -1;
    __builtin_memcpy(out, be, sizeof(*out));
    if (sv->aff_timeout) {
        struct aff_val nv;
        __builtin_memset(&nv, 0, sizeof(nv));
        nv.addr[0] = be->addr[0];
        nv.addr[1] = be->addr[1];
        nv.addr[2] = be->addr[2];
        nv.addr[3] = be->addr[3];
        nv.port = be->port;
        nv.ts = now;
        kp_aff.update(ak, &nv);
    }
    return 0;
}

static __always_inline struct svc_val *svc_lookup(struct svc_key *key, __u8 np_kind)
{
    struct svc_val *sv = kp_svc.lookup(key);
    if (sv)
        return sv;
    /* NodePort: the destination must be one of the node's addresses, then a wildcard entry matches. */
    struct addr_key ak;
    __builtin_memset(&ak, 0, sizeof(ak));
    ak.addr[0] = key->addr[0];
    ak.addr[1] = key->addr[1];
    ak.addr[2] = key->addr[2];
    ak.addr[3] = key->addr[3];
    ak.family = key->kf & 0xf;
    if (!kp_nodeaddr.lookup(&ak))
        return 0;
    struct svc_key np = *key;
    np.addr[0] = np.addr[1] = np.addr[2] = np.addr[3] = 0;
    np.kf = KF(np_kind, key->kf & 0xf);
    return kp_svc.lookup(&np);
}

/* ---- socket LB ---------------------------------------------------------------------------------- */

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
    __u32 p = ctx->protocol;
    if (p == IPPROTO_TCP || p == IPPROTO_UDP || p == IPPROTO_SCTP)
        return p;
    return 0;
}

/* Translate addr (4 words, family ``fam``) : port in place.
 * Returns 1 rewritten, 0 no match, -1 reject (no endpoints), -2 drop (no endpoints for this policy). */
static __always_inline int sock_xlate(struct bpf_sock_addr *ctx, __u32 *addr, __u16 *port, __u8 fam)
{
    __u8 proto = sock_proto(ctx);
    if (!proto)
        return 0;
    struct svc_key key;
    __builtin_memset(&key, 0, sizeof(key));
    key.addr[0] = addr[0];
    key.addr[1] = addr[1];
    key.addr[2] = addr[2];
    key.addr[3] = addr[3];
    key.port = *port;
    key.proto = proto;
    key.kf = KF(KIND_SOCK, fam);
    struct svc_val *sv = svc_lookup(&key, KIND_SOCK_NP);
    if (!sv)
        return 0;
    struct aff_key ak;
    __builtin_memset(&ak, 0, sizeof(ak));
    ak.cookie = bpf_get_netns_cookie(ctx);
    ak.aff_id = sv->aff_id;
    struct be_val be;
    if (pick_backend(sv, &ak, &be) < 0 || be.family != fam)
        return (sv->flags & SVC_F_DROP) ? -2 : -1;
    struct revsk_key rk;
    __builtin_memset(&rk, 0, sizeof(rk));
    rk.cookie = bpf_get_socket_cookie(ctx);
    rk.addr[0] = be.addr[0];
    rk.addr[1] = be.addr[1];
    rk.addr[2] = be.addr[2];
    rk.addr[3] = be.addr[3];
    rk.port = be.port;
    rk.family = fam;
    struct revsk_val rv;
    __builtin_memset(&rv, 0, sizeof(rv));
    rv.addr[0] = addr[0];
    rv.addr[1] = addr[1];
    rv.addr[2] = addr[2];
    rv.addr[3] = addr[3];
    rv.port = *port;
    kp_revsk.update(&rk, &rv);
    addr[0] = be.addr[0];
    addr[1] = be.addr[1];
    addr[2] = be.addr[2];
    addr[3] = be.addr[3];
    *port = be.port;
    return 1;
}

/* Reverse: backend -> VIP for this socket. Returns 1 if rewritten. */
static __always_inline int sock_rev(struct bpf_sock_addr *ctx, __u32 *addr, __u16 *port, __u8 fam)
{
    struct revsk_key rk;
    __builtin_memset(&rk, 0, sizeof(rk));
    rk.cookie = bpf_get_socket_cookie(ctx);
    rk.addr[0] = addr[0];
    rk.addr[1] = addr[1];
    rk.addr[2] = addr[2];
    rk.addr[3] = addr[3];
    rk.port = *port;
    rk.family = fam;
    struct revsk_val *rv = kp_revsk.lookup(&rk);
    if (!rv)
        return 0;
    addr[0] = rv->addr[0];
    addr[1] = rv->addr[1];
    addr[2] = rv->addr[2];
    addr[3] = rv->addr[3];
    *port = rv->port;
    return 1;
}

/* No usable endpoint: the syscall fails at once. kube-proxy REJECTs (ECONNREFUSED) when the Service has
 * no endpoints and DROPs when it has some but none for this traffic's policy: a dropped connect() would
 * only time out, so it fails with ETIMEDOUT right away. */
static __always_inline int reject(struct bpf_sock_addr *ctx, int why)
{
#ifdef KP_SET_RETVAL
    kp_set_retval(why == -2 ? -KP_ETIMEDOUT : -KP_ECONNREFUSED);
#endif
    return 0;
}

static __always_inline int sock4(struct bpf_sock_addr *ctx, int reverse)
{
    __u32 addr[4] = {ctx->user_ip4, 0, 0, 0};
    __u16 port = (__u16)ctx->user_port;
    int r = reverse ? sock_rev(ctx, addr, &port, 4) : sock_xlate(ctx, addr, &port, 4);
    if (r < 0)
        return reject(ctx, r);
    if (r > 0) {
        ctx->user_ip4 = addr[0];
        ctx->user_port = (__u32)port;
    }
    return 1;
}

static __always_inline int sock6(struct bpf_sock_addr *ctx, int reverse)
{
    __u32 addr[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
    __u16 port = (__u16)ctx->user_port;
    /* A v4-mapped address on an AF_INET6 socket is IPv4 traffic: look up the IPv4 service. */
    int mapped = addr[0] == 0 && addr[1] == 0 && addr[2] == KP_HTONL(0xffff);
    int r;
    if (mapped) {
        __u32 a4[4] = {addr[3], 0, 0, 0};
        r = reverse ? sock_rev(ctx, a4, &port, 4) : sock_xlate(ctx, a4, &port, 4);
        addr[3] = a4[0];
    } else {
        r = reverse ? sock_rev(ctx, addr, &port, 6) : sock_xlate(ctx, addr, &port, 6);
    }
    if (r < 0)
        return reject(ctx, r);
    if (r > 0) {
        ctx->user_ip6[0] = addr[0];
        ctx->user_ip6[1] = addr[1];
        ctx->user_ip6[2] = addr[2];
        ctx->user_ip6[3] = addr[3];
        ctx->user_port = (__u32)port;
    }
    return 1;
}

int kp_connect4(struct bpf_sock_addr *ctx) { return sock4(ctx, 0); }
int kp_sendmsg4(struct bpf_sock_addr *ctx) { return sock4(ctx, 0); }
int kp_recvmsg4(struct bpf_sock_addr *ctx) { return sock4(ctx, 1); }
int kp_getpeer4(struct bpf_sock_addr *ctx) { return sock4(ctx, 1); }
int kp_connect6(struct bpf_sock_addr *ctx) { return sock6(ctx, 0); }
int kp_sendmsg6(struct bpf_sock_addr *ctx) { return sock6(ctx, 0); }
int kp_recvmsg6(struct bpf_sock_addr *ctx) { return sock6(ctx, 1); }
int kp_getpeer6(struct bpf_sock_addr *ctx) { return sock6(ctx, 1); }

/* ---- tc: NodePort / externalIP / LB IP from outside ---------------------------------------------- */

struct tuple {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;
    __u16 dport;
    __u8 proto;
    __u8 family;
    __u8 tcp_flags;
    __u32 l3off;
    __u32 l4off;
};

static __always_inline int parse(struct __sk_buff *skb, struct tuple *t)
{
    __u32 l3 = ETH_HLEN;
    t->l3off = l3;
    if (skb->protocol == KP_HTONS(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)) < 0)
            return -1;
        if (ip.frag_off & KP_HTONS(0x3fff)) /* MF or fragment offset: not handled */
            return -1;
        t->family = 4;
        t->proto = ip.protocol;
        t->src[0] = ip.saddr;
        t->dst[0] = ip.daddr;
        t->l4off = l3 + ip.ihl * 4;
    } else if (skb->protocol == KP_HTONS(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, l3, &ip6, sizeof(ip6)) < 0)
            return -1;
        t->family = 6;
        t->proto = ip6.nexthdr; /* extension headers are not handled */
        __builtin_memcpy(t->src, &ip6.saddr, 16);
        __builtin_memcpy(t->dst, &ip6.daddr, 16);
        t->l4off = l3 + sizeof(ip6);
    } else {
        return -1;
    }
    if (t->proto != IPPROTO_TCP && t->proto != IPPROTO_UDP)
        return -1;
    __u16 ports[2];
    if (bpf_skb_load_bytes(skb, t->l4off, ports, sizeof(ports)) < 0)
        return -1;
    t->sport = ports[0];
    t->dport = ports[1];
    if (t->proto == IPPROTO_TCP) {
        __u8 fl;
        if (bpf_skb_load_bytes(skb, t->l4off + 13, &fl, 1) < 0)
            return -1;
        t->tcp_flags = fl;
    }
    return 0;
}

/* Rewrite the source (which = 0) or destination (which = 1) address and port, fixing checksums. */
static __always_inline int rewrite(struct __sk_buff *skb, struct tuple *t, int which, __u32 *naddr, __u16 nport)
{
    __u32 csum_off = t->l4off + (t->proto == IPPROTO_TCP ? 16 : 6);
    __u64 l4flags = t->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
    __u32 *oaddr = which ? t->dst : t->src;
    __u16 oport = which ? t->dport : t->sport;
    if (t->family == 4) {
        __u32 aoff = t->l3off + (which ? 16 : 12);
        if (bpf_l3_csum_replace(skb, t->l3off + 10, oaddr[0], naddr[0], 4) < 0)
            return -1;
        if (bpf_l4_csum_replace(skb, csum_off, oaddr[0], naddr[0], BPF_F_PSEUDO_HDR | 4 | l4flags) < 0)
            return -1;
        if (bpf_skb_store_bytes(skb, aoff, naddr, 4, 0) < 0)
            return -1;
    } else {
        __u32 aoff = t->l3off + (which ? 24 : 8);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (bpf_l4_csum_replace(skb, csum_off, oaddr[i], naddr[i], BPF_F_PSEUDO_HDR | 4 | l4flags) < 0)
                return -1;
        }
        if (bpf_skb_store_bytes(skb, aoff, naddr, 16, 0) < 0)
            return -1;
    }
    if (oport != nport) {
        if (bpf_l4_csum_replace(skb, csum_off, oport, nport, 2 | l4flags) < 0)
            return -1;
        if (bpf_skb_store_bytes(skb, t->l4off + (which ? 2 : 0), &nport, 2, 0) < 0)
            return -1;
    }
    return 0;
}

static __always_inline __u64 ct_lifetime(struct tuple *t, struct ct_val *cv)
{
    if (t->proto != IPPROTO_TCP)
        return CT_UDP_LIFETIME;
    return (cv->flags & CT_FLAG_CLOSING) ? CT_CLOSE_LIFETIME : CT_TCP_LIFETIME;
}

static __always_inline void ct_key_of(struct tuple *t, struct ct_key *k)
{
    __builtin_memset(k, 0, sizeof(*k));
    __builtin_memcpy(k->src, t->src, 16);
    __builtin_memcpy(k->dst, t->dst, 16);
    k->sport = t->sport;
    k->dport = t->dport;
    k->proto = t->proto;
    k->family = t->family;
}

static __always_inline int member_ok(__u32 aff_id, struct ct_val *cv)
{
    struct member_key mk;
    __builtin_memset(&mk, 0, sizeof(mk));
    mk.aff_id = aff_id;
    __builtin_memcpy(mk.addr, cv->addr, 16);
    mk.port = cv->port;
    return kp_member.lookup(&mk) != 0;
}

int kp_tc_in(struct __sk_buff *skb)
{
    struct tuple t;
    __builtin_memset(&t, 0, sizeof(t));
    if (parse(skb, &t) < 0)
        return TC_ACT_OK;
    __u64 now = bpf_ktime_get_ns();
    __u8 closing = t.proto == IPPROTO_TCP && (t.tcp_flags & 0x05); /* FIN or RST */
    struct ct_key fk;
    ct_key_of(&t, &fk);
    struct ct_val *cv = kp_ct_fwd.lookup(&fk);
    struct ct_val nv;
    __builtin_memset(&nv, 0, sizeof(nv));
    if (cv && now - cv->ts <= ct_lifetime(&t, cv)
        /* UDP flows to a removed backend are re-balanced (kube-proxy deletes their conntrack entries) */
        && (t.proto == IPPROTO_TCP || member_ok(cv->aff_id, cv))) {
        cv->ts = now;
        if (closing)
            cv->flags |= CT_FLAG_CLOSING;
        __builtin_memcpy(&nv, cv, sizeof(nv));
    } else {
        struct svc_key key;
        __builtin_memset(&key, 0, sizeof(key));
        __builtin_memcpy(key.addr, t.dst, 16);
        key.port = t.dport;
        key.proto = t.proto;
        key.kf = KF(KIND_TC, t.family);
        struct svc_val *sv = svc_lookup(&key, KIND_NODEPORT);
        if (!sv)
            return TC_ACT_OK;
        if (sv->flags & SVC_F_SRC_RANGES) {
            struct src_key sk;
            __builtin_memset(&sk, 0, sizeof(sk));
            sk.prefixlen = 32 + (t.family == 4 ? 32 : 128);
            sk.aff_id = sv->aff_id;
            __builtin_memcpy(sk.addr, t.src, 16);
            if (!kp_srcrange.lookup(&sk))
                return TC_ACT_SHOT; /* outside loadBalancerSourceRanges */
        }
        struct aff_key ak;
        __builtin_memset(&ak, 0, sizeof(ak));
        __builtin_memcpy(ak.client, t.src, 16);
        ak.aff_id = sv->aff_id;
        struct be_val be;
        if (pick_backend(sv, &ak, &be) < 0 || be.family != t.family)
            return TC_ACT_SHOT; /* no usable endpoint */
        __builtin_memcpy(nv.addr, be.addr, 16);
        nv.port = be.port;
        nv.aff_id = sv->aff_id;
        nv.ts = now;
        nv.flags = (closing ? CT_FLAG_CLOSING : 0) | ((sv->flags & SVC_F_SNAT) ? CT_FLAG_SNAT : 0);
        kp_ct_fwd.update(&fk, &nv);
        /* the reply tuple: backend -> client */
        struct ct_key rk;
        __builtin_memset(&rk, 0, sizeof(rk));
        __builtin_memcpy(rk.src, be.addr, 16);
        __builtin_memcpy(rk.dst, t.src, 16);
        rk.sport = be.port;
        rk.dport = t.sport;
        rk.proto = t.proto;
        rk.family = t.family;
        struct ct_val rv;
        __builtin_memset(&rv, 0, sizeof(rv));
        __builtin_memcpy(rv.addr, t.dst, 16);
        rv.port = t.dport;
        rv.aff_id = sv->aff_id;
        rv.ts = now;
        kp_ct_rev.update(&rk, &rv);
    }
    if (rewrite(skb, &t, 1, nv.addr, nv.port) < 0)
        return TC_ACT_SHOT;
    /* Source NAT is left to netfilter (one masquerade rule on the mark, see snat.py): conntrack then
     * owns the port allocation and un-SNATs replies before they reach kp_tc_out. */
    if (nv.flags & CT_FLAG_SNAT)
        skb->mark |= KP_MASQ_MARK;
    return TC_ACT_OK;
}

int kp_tc_out(struct __sk_buff *skb)
{
    struct tuple t;
    __builtin_memset(&t, 0, sizeof(t));
    if (parse(skb, &t) < 0)
        return TC_ACT_OK;
    struct ct_key rk;
    ct_key_of(&t, &rk);
    struct ct_val *rv = kp_ct_rev.lookup(&rk);
    if (!rv)
        return TC_ACT_OK;
    __u64 now = bpf_ktime_get_ns();
    if (now - rv->ts > ct_lifetime(&t, rv) + NSEC) {
        kp_ct_rev.delete(&rk);
        return TC_ACT_OK;
    }
    rv->ts = now;
    if (t.proto == IPPROTO_TCP && (t.tcp_flags & 0x05))
        rv->flags |= CT_FLAG_CLOSING;
    __u32 addr[4];
    __builtin_memcpy(addr, rv->addr, 16);
    if (rewrite(skb, &t, 0, addr, rv->port) < 0)
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}
