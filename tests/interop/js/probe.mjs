// js-libp2p interop probe for lloom: dial a validator, wait for identify, ping it, then find
// the providers of a key through its DHT. Prints exactly one JSON object on stdout and exits
// by itself within --timeout-ms (0 on success, 1 with {"error": ...} on failure);
// diagnostics go to stderr. It dials loopback addresses only.
//
//   node probe.mjs --addr /ip4/127.0.0.1/tcp/4001/p2p/16Uiu2... \
//     (--name lloom/executor/v1 | --key bafkrei...) [--timeout-ms 15000]

import { writeSync } from 'node:fs'

// Node 20 lacks Promise.withResolvers, which libp2p 2.x uses. Static imports are evaluated
// before this module's body, so libp2p is loaded with dynamic import() after the polyfill.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const RAW = 0x55 // multicodec of the `raw` CID codec
const DEFAULT_TIMEOUT_MS = 15000
const USAGE = 'usage: node probe.mjs --addr <multiaddr/p2p/PeerId> (--name NAME | --key CID) [--timeout-ms N]'

let node = null
let finished = false
let phase = 'starting' // reported when the probe times out

function log (msg) {
  process.stderr.write(`probe: ${msg}\n`)
}

// Write the one JSON line synchronously and exit: nothing can be printed twice.
function exitWith (code, doc) {
  if (finished) return
  finished = true
  writeSync(1, JSON.stringify(doc) + '\n')
  process.exit(code)
}

// Stop the node (bounded), then exit.
async function finish (code, doc, stopBudgetMs = 1000) {
  if (finished) return
  if (node != null) {
    const n = node
    node = null
    await Promise.race([
      n.stop().catch((err) => log(`stop: ${err.message ?? err}`)),
      new Promise((resolve) => setTimeout(resolve, stopBudgetMs).unref())
    ])
  }
  exitWith(code, doc)
}

function parseArgs (argv) {
  const out = { timeoutMs: DEFAULT_TIMEOUT_MS }
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]]
    if (flag === '--help' || flag === '-h') throw new Error(USAGE)
    if (value === undefined) throw new Error(`missing value for ${flag}; ${USAGE}`)
    if (flag === '--addr') out.addr = value
    else if (flag === '--name') out.name = value
    else if (flag === '--key') out.key = value
    else if (flag === '--timeout-ms') out.timeoutMs = Number(value)
    else throw new Error(`unknown flag ${flag}; ${USAGE}`)
  }
  if (!out.addr || (out.name == null && out.key == null)) throw new Error(USAGE)
  if (out.name != null && out.key != null) throw new Error('give --name or --key, not both')
  if (!Number.isFinite(out.timeoutMs) || out.timeoutMs < 1000) throw new Error('--timeout-ms must be a number >= 1000')
  return out
}

function isLoopback (ma) {
  const first = ma.stringTuples()[0]
  if (first == null) return false
  const [code, value] = first
  if (code === 4) return value.startsWith('127.') // ip4
  if (code === 41) return value === '::1' // ip6
  return false
}

async function main () {
  const started = performance.now()
  const args = parseArgs(process.argv.slice(2))
  const deadline = started + args.timeoutMs
  const remaining = () => Math.max(1, Math.floor(deadline - performance.now()))

  // Hard limit: whatever hangs, exit before --timeout-ms (keep ~0.5 s to stop the node).
  const stopBudget = 500
  setTimeout(() => {
    finish(1, { error: `timed out after ${args.timeoutMs} ms while ${phase}` }, stopBudget - 100)
  }, args.timeoutMs - stopBudget).unref()
  const soft = () => AbortSignal.timeout(Math.max(1, remaining() - stopBudget))

  const [{ createLibp2p }, { tcp }, { noise }, { yamux }, { identify }, { ping }, kad, { multiaddr }, { CID }, { sha256 }] =
    await Promise.all([
      import('libp2p'), import('@libp2p/tcp'), import('@chainsafe/libp2p-noise'),
      import('@chainsafe/libp2p-yamux'), import('@libp2p/identify'), import('@libp2p/ping'),
      import('@libp2p/kad-dht'), import('@multiformats/multiaddr'), import('multiformats/cid'),
      import('multiformats/hashes/sha2')
    ])

  const cid = args.key != null
    ? CID.parse(args.key)
    : CID.createV1(RAW, await sha256.digest(new TextEncoder().encode(args.name)))

  const target = multiaddr(args.addr)
  const remotePeer = target.getPeerId()
  if (remotePeer == null) throw new Error(`--addr must end in /p2p/<PeerId>: ${args.addr}`)
  if (!isLoopback(target)) throw new Error(`--addr must be a loopback address: ${args.addr}`)

  node = await createLibp2p({
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    // Never dial anything but loopback, whatever a DHT response contains.
    connectionGater: { denyDialMultiaddr: async (ma) => !isLoopback(ma) },
    services: {
      identify: identify(),
      // kad-dht pings a new DHT peer before adding it to its routing table; with the default
      // of one outbound ping stream per connection our own ping would make that one fail.
      ping: ping({ maxOutboundStreams: 4 }),
      dht: kad.kadDHT({
        clientMode: true,
        protocol: '/ipfs/kad/1.0.0',
        // lookups wait for the first self-query, which otherwise starts only after 1 s
        initialQuerySelfInterval: 0,
        // the default mapper drops private (and so loopback) addresses
        peerInfoMapper: kad.removePublicAddressesMapper
      })
    }
  })

  const identified = new Promise((resolve) => {
    node.addEventListener('peer:identify', (evt) => {
      if (evt.detail.peerId.toString() === remotePeer) resolve(evt.detail)
    })
  })

  phase = 'dialing'
  const conn = await node.dial(target, { signal: soft() })
  log(`connected to ${conn.remotePeer} in ${Math.round(performance.now() - started)} ms`)
  phase = 'waiting for identify'
  const info = await identified
  log(`identified ${info.agentVersion}`)
  phase = 'pinging'
  const pingMs = await node.services.ping.ping(target, { signal: soft() })
  log(`ping ${pingMs} ms`)

  // Stop looking 1 s before the deadline so that connection, identify and ping are still
  // reported when no provider turns up ("providers": []).
  phase = 'looking up providers'
  const lookupStart = performance.now()
  const providers = []
  try {
    const signal = AbortSignal.timeout(Math.max(1, remaining() - stopBudget - 1000))
    for await (const provider of node.contentRouting.findProviders(cid, { signal })) {
      providers.push({ peer_id: provider.id.toString(), addrs: provider.multiaddrs.map(String) })
      break
    }
  } catch (err) {
    if (err.name !== 'AbortError' && err.name !== 'TimeoutError') throw err
    log(`lookup stopped: ${err.message}`)
  }
  const lookupMs = Math.round(performance.now() - lookupStart)
  log(`lookup ${lookupMs} ms, ${providers.length} provider(s)`)

  await finish(0, {
    connected: conn.status === 'open',
    remote_peer: conn.remotePeer.toString(),
    agent_version: info.agentVersion ?? null,
    protocols: info.protocols,
    ping_ms: pingMs,
    cid: cid.toString(),
    lookup_ms: lookupMs,
    providers
  }, stopBudget)
}

function fail (err) {
  log(err?.stack ?? String(err))
  const aborted = err?.name === 'AbortError' || err?.name === 'TimeoutError'
  const message = aborted ? `timed out while ${phase}` : String(err?.message ?? err)
  finish(1, { error: message }, 400)
}

process.on('unhandledRejection', fail)
process.on('uncaughtException', fail)
main().catch(fail)
