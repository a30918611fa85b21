// Deepgram's JS SDK (@deepgram/sdk) streaming a file to an edge daemon, as an app would.
// Usage: node live.cjs <host:port> <key> <pcm16 mono 16 kHz file> '<connect options JSON>'
// Prints every message the SDK delivers as one JSON line, then {"closed": code}.
const fs = require("fs");
const { DeepgramClient } = require("@deepgram/sdk");

async function main() {
  const [base, key, path, options] = process.argv.slice(2);
  const client = new DeepgramClient({
    apiKey: key,
    environment: { base: `http://${base}`, production: `ws://${base}`,
                   agent: `ws://${base}`, agentRest: `http://${base}` },
  });
  const connection = await client.listen.v1.connect({
    model: "nova-3", encoding: "linear16", sample_rate: 16000, ...JSON.parse(options),
  });
  const done = new Promise((resolve) => {
    connection.on("close", (event) => resolve(event && event.code));
  });
  connection.on("message", (data) => process.stdout.write(JSON.stringify(data) + "\n"));
  connection.on("error", (error) => process.stdout.write(JSON.stringify({ error: String(error) }) + "\n"));
  connection.connect();
  await connection.waitForOpen();
  const audio = fs.readFileSync(path);
  for (let i = 0; i < audio.length; i += 3200) {
    connection.sendMedia(audio.subarray(i, i + 3200));
    await new Promise((r) => setTimeout(r, 25)); // 100 ms of audio every 25 ms: 4x real time
  }
  connection.sendCloseStream({ type: "CloseStream" });
  const code = await done;
  process.stdout.write(JSON.stringify({ closed: code }) + "\n");
  process.exit(0);
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack || error) + "\n");
  process.exit(1);
});
