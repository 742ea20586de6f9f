#!/bin/sh
# One-shot (service kafka-certs in docker-compose.sasl.yml), in the apache/kafka image
# (keytool; no openssl needed): a self-signed CA and a broker certificate for the names
# clients use (kafka inside compose, localhost from the host). Writes
#   $TLS_DIR (/tls): kafka.keystore.p12, kafka.truststore.p12, password, ca.crt (broker)
#   $CA_DIR (/ca):   ca.crt (every client: ADLOOP_SSL_CAFILE)
# Runs once: an existing keystore is kept, so clients keep trusting the same CA.
set -eu

tls=${TLS_DIR:-/tls}
ca=${CA_DIR:-/ca}
if [ -f "$tls/kafka.keystore.p12" ]; then
    echo "broker keystore exists; keeping it"
    exit 0
fi
work=$(mktemp -d)
password=$(tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32)
days=825
key_size=${KEY_SIZE:-3072}

keytool -genkeypair -alias ca -keyalg RSA -keysize "$key_size" -validity "$days" \
    -dname "CN=adloop kafka CA" -ext bc:c -keystore "$work/ca.p12" -storetype PKCS12 \
    -storepass "$password"
keytool -exportcert -rfc -alias ca -keystore "$work/ca.p12" -storepass "$password" \
    -file "$work/ca.crt"

keytool -genkeypair -alias kafka -keyalg RSA -keysize "$key_size" -validity "$days" \
    -dname "CN=kafka" -keystore "$tls/kafka.keystore.p12" -storetype PKCS12 \
    -storepass "$password"
keytool -certreq -alias kafka -keystore "$tls/kafka.keystore.p12" -storepass "$password" \
    -file "$work/kafka.csr"
keytool -gencert -alias ca -keystore "$work/ca.p12" -storepass "$password" \
    -infile "$work/kafka.csr" -outfile "$work/kafka.crt" -rfc -validity "$days" \
    -ext "SAN=DNS:kafka,DNS:localhost,IP:127.0.0.1" -ext ku:c=digitalSignature,keyEncipherment \
    -ext eku=serverAuth,clientAuth
keytool -importcert -noprompt -alias ca -file "$work/ca.crt" \
    -keystore "$tls/kafka.keystore.p12" -storepass "$password"
keytool -importcert -noprompt -alias kafka -file "$work/kafka.crt" \
    -keystore "$tls/kafka.keystore.p12" -storepass "$password"
keytool -importcert -noprompt -alias ca -file "$work/ca.crt" \
    -keystore "$tls/kafka.truststore.p12" -storetype PKCS12 -storepass "$password"

cp "$work/ca.crt" "$tls/ca.crt"
cp "$work/ca.crt" "$ca/ca.crt"
printf '%s' "$password" >"$tls/password"
# The CA key is not kept: another broker certificate means a new CA (fresh volumes).
rm -rf "$work"
# The broker (uid 1000 in apache/kafka) reads $tls; only it mounts that volume.
chown -R "${BROKER_UID:-1000}:${BROKER_UID:-1000}" "$tls"
chmod 600 "$tls/password" "$tls/kafka.keystore.p12"
chmod 644 "$tls/kafka.truststore.p12" "$tls/ca.crt" "$ca/ca.crt"
echo "kafka TLS ready"
