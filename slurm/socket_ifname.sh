#!/usr/bin/env bash
# Print the network interface this node uses to reach HOST (name or IPv4 address).
#
#   slurm/socket_ifname.sh HOST
#
# launch.sh calls it with another node of the job and exports the result as
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME. Why: gloo groups cross nodes, and gloo binds the
# address its own hostname resolves to, which /etc/hosts often maps to 127.0.1.1; the other
# nodes then cannot connect. The interface that routes to a peer is the one they reach us on.
# Exits 1 with a message when HOST does not resolve or is reached over loopback.
set -euo pipefail
host="${1:?usage: socket_ifname.sh HOST}"
addr="$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }')" || addr=""
if [[ -z "$addr" ]]; then
	echo "socket_ifname.sh: cannot resolve $host" >&2
	exit 1
fi
dev="$(ip -o -4 route get "$addr" | sed -n 's/.* dev \([^ ]*\).*/\1/p')"
if [[ -z "$dev" || "$dev" == lo ]]; then
	echo "socket_ifname.sh: $host ($addr) is reached over ${dev:-no interface}, not a network interface" >&2
	exit 1
fi
echo "$dev"
