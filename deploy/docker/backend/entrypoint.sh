#!/bin/bash
# Starts one compose backend: Dovecot and Postfix in the foreground; when either exits,
# the container exits (and Docker's restart policy brings it back).
set -euo pipefail
name=${BACKEND_NAME:?set BACKEND_NAME (b1, b2)}

cat > /etc/dovecot/instance.conf <<EOT
instance_name = dovecot-$name
login_greeting = Dovecot $name ready.
imap_id_send = name postern-backend-$name
EOT
postconf -e "myhostname=$name.example.test"
# The shared maildir volume starts empty and root-owned.
chown vmail:vmail /var/vmail
chmod 0750 /var/vmail

dovecot -F &
postfix start-fg &
wait -n
echo "a service of backend $name exited; stopping" >&2
exit 1
