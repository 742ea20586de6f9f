#!/bin/sh
# Run once on the host, before `docker compose -f docker-compose.yml -f
# docker-compose.sasl.yml up`: a random password per Kafka principal, one file each in
# deploy/kafka/secrets/ (git-ignored), which compose mounts as secrets (/run/secrets/).
# Existing files are kept. Hex passwords: no character needs quoting in Kafka's
# "SCRAM-SHA-512=[password=...]" syntax or in a JAAS line.
set -eu

dir=$(dirname "$0")/secrets
mkdir -p "$dir"
for principal in admin exchange ingest worker serve loop generator; do
    file="$dir/$principal"
    if [ ! -s "$file" ]; then
        (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$file")
    fi
done
# Containers read these as other users (kafka runs as uid 1000): readable, but the
# directory is the operator's to guard.
chmod 644 "$dir"/*
chmod 700 "$dir"
echo "secrets in $dir"
