// Compile contracts/Accounting.sol with solcjs (npm "solc"; no native solc is needed) and
// write lloom/chain/Accounting.json (package data) with the ABI and the creation bytecode.
//   node scripts/compile_contract.mjs [--out PATH]
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const solc = require('solc')
const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const outIndex = process.argv.indexOf('--out')
const out = outIndex > 0 ? process.argv[outIndex + 1] : join(root, 'lloom', 'chain', 'Accounting.json')

const input = {
  language: 'Solidity',
  sources: { 'Accounting.sol': { content: readFileSync(join(root, 'contracts', 'Accounting.sol'), 'utf8') } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'cancun',
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } }
  }
}
const output = JSON.parse(solc.compile(JSON.stringify(input)))
const errors = (output.errors || []).filter((e) => e.severity === 'error')
for (const e of output.errors || []) process.stderr.write(e.formattedMessage + '\n')
if (errors.length) process.exit(1)
const contract = output.contracts['Accounting.sol'].Accounting
const artifact = {
  contractName: 'Accounting',
  compiler: `solc ${solc.version()}`,
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'cancun',
  abi: contract.abi,
  bytecode: '0x' + contract.evm.bytecode.object
}
mkdirSync(dirname(out), { recursive: true })
writeFileSync(out, JSON.stringify(artifact, null, 2) + '\n')
process.stderr.write(`wrote ${out}\n`)
