// js-libp2p interop probe for lloom: dial a validator, identify and ping it, then find the
// providers of a key through its DHT. Prints exactly one JSON object on stdout and exits
// (0 on success, 1 on failure); diagnostics go to stderr.
//
//   node probe.mjs --addr /ip4/127.0.0.1/tcp/4001/p2p/16Uiu2... (--name lloom/executor/v1 | --key bafkrei...) [--timeout-ms 15000]

// Node 20 lacks Promise.withResolvers, which libp2p 2.x uses.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { kadDHT, removePublicAddressesMapper } from '@libp2p/kad-dht'
import { multiaddr } from '@multiformats/multiaddr'
import { CID } from 'multiformats/cid'
import { sha256 } from 'multiformats/hashes/sha2'

const RAW = 0x55

function parseArgs (argv) {
  const out = { timeoutMs: 15000 }
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]]
    if (value === undefined) throw new Error(`missing value for ${flag}`)
    if (flag === '--addr') out.addr = value
    else if (flag === '--name') out.name = value
    else if (flag === '--key') out.key = value
    else if (flag === '--timeout-ms') out.timeoutMs = Number(value)
    else throw new Error(`unknown flag ${flag}`)
  }
  if (!out.addr || (!out.name && !out.key)) throw new Error('need --addr and --name or --key')
  return out
}

async function keyCid (args) {
  if (args.key) return CID.parse(args.key)
  const digest = await sha256.digest(new TextEncoder().encode(args.name))
  return CID.createV1(RAW, digest)
}

function finish (code, doc) {
  process.stdout.write(JSON.stringify(doc) + '\n', () => process.exit(code))
}

async function main () {
  const args = parseArgs(process.argv.slice(2))
  const timer = setTimeout(() => finish(1, { error: `timed out after ${args.timeoutMs} ms` }), args.timeoutMs)
  const node = await createLibp2p({
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify(),
      ping: ping(),
      dht: kadDHT({ clientMode: true, protocol: '/ipfs/kad/1.0.0', peerInfoMapper: removePublicAddressesMapper })
    }
  })
  const target = multiaddr(args.addr)
  const remotePeer = target.getPeerId()
  const identified = new Promise((resolve) => {
    node.addEventListener('peer:identify', (evt) => {
      if (evt.detail.peerId.toString() === remotePeer) resolve(evt.detail)
    })
  })
  const conn = await node.dial(target)
  const info = await identified
  // Look up first: kad-dht pings a new peer before adding it to its routing table, and a
  // ping of our own at the same time would be refused (one ping stream per peer).
  const cid = await keyCid(args)
  const providers = []
  for await (const provider of node.contentRouting.findProviders(cid, { signal: AbortSignal.timeout(args.timeoutMs) })) {
    providers.push({ peer_id: provider.id.toString(), addrs: provider.multiaddrs.map(String) })
    break
  }
  const rtt = await node.services.ping.ping(target)
  clearTimeout(timer)
  const doc = {
    connected: conn.status === 'open',
    remote_peer: conn.remotePeer.toString(),
    agent_version: info.agentVersion ?? null,
    protocols: info.protocols,
    ping_ms: rtt,
    cid: cid.toString(),
    providers
  }
  await node.stop()
  finish(0, doc)
}

main().catch((err) => {
  process.stderr.write(`${err.stack ?? err}\n`)
  finish(1, { error: String(err.message ?? err) })
})
