#!/bin/sh
# Starts the SASL_SSL broker of docker-compose.sasl.yml (in the apache/kafka image).
# The admin's SCRAM credential must exist before any client can log in, the broker's own
# inter-broker login included, so it is written into the metadata log when the storage
# is formatted (kafka-storage.sh --add-scram, KIP-900); the other principals are created
# by setup-security.sh over a SASL_SSL admin connection.
set -eu

secret() { tr -d '\r\n' <"/run/secrets/kafka-$1"; }
admin_password=$(secret admin)
tls_password=$(cat /etc/kafka/tls/password)
props=/tmp/server.properties

cp /etc/adloop-kafka/server.properties "$props"
{
    for listener in internal external; do
        printf 'listener.name.%s.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="%s";\n' \
            "$listener" "$admin_password"
    done
    printf 'ssl.keystore.password=%s\nssl.key.password=%s\nssl.truststore.password=%s\n' \
        "$tls_password" "$tls_password" "$tls_password"
} >>"$props"
chmod 600 "$props"

# The healthcheck's (and an operator's) admin client configuration.
cat >/tmp/admin.properties <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_password";
ssl.truststore.type=PEM
ssl.truststore.location=/etc/kafka/tls/ca.crt
PROPS
chmod 600 /tmp/admin.properties

if [ ! -f /var/lib/kafka/data/meta.properties ]; then
    /opt/kafka/bin/kafka-storage.sh format --config "$props" --cluster-id "$CLUSTER_ID" \
        --add-scram "SCRAM-SHA-512=[name=admin,password=$admin_password]"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$props"
