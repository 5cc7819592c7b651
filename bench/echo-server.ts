/**
 * The echo ceiling server, run as a child process of a benchmark (as the real server is a
 * process of its own). It reads its TLS material as JSON on stdin, listens on
 * 127.0.0.1:0 with the real server's mutual-TLS 1.3 credentials and the real server's
 * listener options, prints one ready line on stdout and runs until SIGTERM/SIGINT.
 *
 *   node dist/bench/echo-server.js < config.json
 */
import { Server, type sendUnaryData, type ServerUnaryCall } from '@grpc/grpc-js';
import { mutualTlsCredentials } from '../server/src/app/tls.js';
import { EchoServiceDefinition, type EchoReady, type EchoServerConfig } from './echo-service.js';

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

async function main(): Promise<void> {
  const config = JSON.parse(await readStdin()) as EchoServerConfig;
  // The same listener options as server/src/app/grpc-server.ts uses for the main listener.
  const server = new Server({
    'grpc.max_receive_message_length': 1024 * 1024,
    'grpc.max_send_message_length': 64 * 1024 * 1024,
    'grpc.max_concurrent_streams': 256,
    'grpc.keepalive_time_ms': 60_000,
    'grpc.keepalive_permit_without_calls': 1,
  });
  server.addService(EchoServiceDefinition, {
    echo: (call: ServerUnaryCall<Buffer, Buffer>, callback: sendUnaryData<Buffer>) => callback(null, call.request),
  });
  const credentials = mutualTlsCredentials(config.caCertPem, config.certChainPem, Buffer.from(config.keyPem));
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', credentials, (err, p) => (err ? reject(err) : resolve(p)));
  });
  const ready: EchoReady = { event: 'ready', port, pid: process.pid };
  process.stdout.write(JSON.stringify(ready) + '\n');
  const stop = (): void => {
    server.tryShutdown(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

main().catch((err: unknown) => {
  process.stderr.write(`echo-server: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(1);
});
