#!/usr/bin/env bash
# Loopback SSH for the cluster-launcher test (tests/test_ray_cluster.py): `ray up` / `ray submit` /
# `ray down` with Ray's local provider reach the "head node" 127.0.0.1 over SSH as root.
#
# Idempotent. Installs Debian's openssh-server and rsync when missing, generates a key pair in
# $MULTIMAE_SSH_DIR (default /tmp/multimae-ssh), authorizes its public key for root, and starts an
# sshd that listens on 127.0.0.1 only and accepts keys only. Prints the private key path last;
# the test finds it there (or via MULTIMAE_SSH_KEY).
set -euo pipefail

DIR=${MULTIMAE_SSH_DIR:-/tmp/multimae-ssh}
KEY=$DIR/id_ed25519

if ! command -v /usr/sbin/sshd >/dev/null || ! command -v rsync >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openssh-server openssh-client rsync >/dev/null
fi

mkdir -p "$DIR" /root/.ssh /run/sshd
chmod 700 "$DIR" /root/.ssh
[ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N '' -C multimae-ci -f "$KEY"
touch /root/.ssh/authorized_keys
grep -qxF "$(cat "$KEY.pub")" /root/.ssh/authorized_keys || cat "$KEY.pub" >> /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
ssh-keygen -A >/dev/null  # host keys, only those missing

cat > "$DIR/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port 22
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
PidFile $DIR/sshd.pid
Subsystem sftp internal-sftp
CONF

if ! { [ -f "$DIR/sshd.pid" ] && kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null; }; then
  /usr/sbin/sshd -f "$DIR/sshd_config"
fi

for _ in $(seq 50); do
  if ssh -i "$KEY" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
       -o ConnectTimeout=2 -o LogLevel=ERROR root@127.0.0.1 true; then
    echo "$KEY"
    exit 0
  fi
  sleep 0.2
done
echo "setup_ssh.sh: sshd on 127.0.0.1:22 does not accept the key $KEY" >&2
exit 1
