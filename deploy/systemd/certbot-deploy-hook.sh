#!/bin/sh
# certbot deploy hook for wsgate: copy the renewed certificate where wsgate reads it, with
# permissions the wsgate user can read, then reload (SIGHUP: no session is dropped).
#
# Install:  install -m 0755 certbot-deploy-hook.sh /etc/letsencrypt/renewal-hooks/deploy/wsgate.sh
# certbot sets RENEWED_LINEAGE (e.g. /etc/letsencrypt/live/chat.example.com).
set -eu
: "${RENEWED_LINEAGE:?run by certbot as a deploy hook}"
dest=/etc/wsgate/tls
umask 027
install -d -m 0750 -o root -g wsgate "$dest"
# Write to temporary names and rename (atomic per file); wsgate reads them only on the
# reload below, after both are in place.
install -m 0644 -o root -g wsgate "$RENEWED_LINEAGE/fullchain.pem" "$dest/.fullchain.pem.new"
install -m 0640 -o root -g wsgate "$RENEWED_LINEAGE/privkey.pem" "$dest/.privkey.pem.new"
mv -f "$dest/.fullchain.pem.new" "$dest/fullchain.pem"
mv -f "$dest/.privkey.pem.new" "$dest/privkey.pem"
systemctl reload wsgate.service
