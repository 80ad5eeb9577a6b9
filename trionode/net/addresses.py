"""Which addresses a node hands out: dialable ones only, never ``0.0.0.0``.

A listener bound to the wildcard (``/ip4/0.0.0.0/tcp/2428`` or ``/ip6/::/tcp/2428``)
accepts on every interface, but the wildcard itself means "this host" to whoever dials it:
a joiner who dials ``0.0.0.0`` from an invitation reaches its own machine. So a wildcard
listen address is *expanded* into one address per interface address of the matching family.
Rules, in order:

- ``network.announce`` addresses come first (an operator knows its public address or DNS
  name better than the interface list does); with ``network.announce_replace`` they are the
  only addresses advertised.
- A wildcard becomes the interface addresses of its family, except link-local ones (they
  need a zone and rarely reach another machine) and loopback, which is used only when the
  machine has nothing else (a laptop with no network still works with itself).
- A concrete listen address is advertised as it is.
- Duplicates are dropped; order is kept.

Everything here except :func:`interface_ips` is pure; the Host calls it once its listeners
are bound (a port 0 is concrete by then).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

import ifaddr

from trionode.wire.multiaddr import Multiaddr

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def interface_ips() -> list[str]:
    """Every IP address configured on this machine's interfaces (loopback included).

    Returns an empty list (and logs once) when the platform will not tell.
    """
    try:
        adapters = ifaddr.get_adapters()
    except OSError as exc:  # pragma: no cover - platform-specific
        log.warning("cannot list network interfaces: %s", exc)
        return []
    found: list[str] = []
    for adapter in adapters:
        for ip in adapter.ips:
            # ifaddr gives IPv4 as a str and IPv6 as (address, flowinfo, scope_id).
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            found.append(text.split("%", 1)[0])
    return found


def is_unspecified(addr: Multiaddr) -> bool:
    """Whether ``addr`` starts with the wildcard ``/ip4/0.0.0.0`` or ``/ip6/::``."""
    ip = _ip_of(addr)
    return ip is not None and ip.is_unspecified


def expand_wildcards(listen: Sequence[Multiaddr], ips: Iterable[str]) -> list[Multiaddr]:
    """Replace each wildcard listen address by the usable interface addresses of its family.

    See the module docstring for which interface addresses are usable.
    """
    parsed = [ipaddress.ip_address(text) for text in dict.fromkeys(ips) if _is_ip(text)]
    out: list[Multiaddr] = []
    for addr in listen:
        ip = _ip_of(addr)
        if ip is None or not ip.is_unspecified:
            out.append(addr)
            continue
        family = [a for a in parsed if a.version == ip.version and not a.is_link_local]
        chosen = [a for a in family if not a.is_loopback] or [a for a in family if a.is_loopback]
        rest = addr.components[1:]
        out.extend(
            Multiaddr((Multiaddr.from_tcp(str(concrete), 0).components[0], *rest))
            for concrete in chosen
        )
    return list(dict.fromkeys(out))


def advertised_addresses(
    listen: Sequence[Multiaddr],
    ips: Iterable[str],
    *,
    announce: Sequence[Multiaddr] = (),
    announce_replace: bool = False,
) -> list[Multiaddr]:
    """The addresses a node tells others to dial it at (without ``/p2p``)."""
    announced = [a.without_peer_id() for a in announce]
    if announce_replace and announced:
        return list(dict.fromkeys(announced))
    expanded = expand_wildcards([a.without_peer_id() for a in listen], ips)
    return [a for a in dict.fromkeys([*announced, *expanded]) if not is_unspecified(a)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ip_of(addr: Multiaddr) -> IPAddress | None:
    if not addr.components or addr.components[0].name not in {"ip4", "ip6"}:
        return None
    text = addr.components[0].value_text()
    return None if text is None else ipaddress.ip_address(text)
