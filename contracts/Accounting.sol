// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/**
 * @title Accounting
 * @dev Records token usage for the lloom network. The evidence of work is the
 * UsageRecorded (unverified) and UsageSettled (client-signed) events, which can be indexed
 * and verified off-chain.
 *
 * Two ways to record usage:
 * - recordUsage: the design's unverified path, one record per call; the executor alone
 *   vouches for the numbers.
 * - settle: the verified path, with its own event (UsageSettled) and totals
 *   (verifiedTokensByExecutor). Each receipt is an EIP-712 signature by the client over the
 *   running totals of one channel (executor, client, model). The contract keeps the total
 *   settled per channel, so a receipt settles every request since the last one, replays
 *   and old receipts settle nothing, and an executor cannot record usage a client did not
 *   sign. A bad receipt is skipped with ReceiptRejected; the rest of the batch proceeds.
 */
contract Accounting {
    address public owner;

    event UsageRecorded(
        address indexed executor,
        address indexed client,
        string model,
        uint256 tokenCount,
        uint256 timestamp
    );

    /// @dev reason: 1 bad signature, 2 expired, 3 nothing new (replayed or older), 4 too large
    /// Verified usage: emitted by settle for the new tokens of a client-signed receipt. It
    /// has the shape of UsageRecorded but its own name, so verified usage is never mistaken
    /// for the unverified kind that any executor can record for any client.
    event UsageSettled(
        address indexed executor,
        address indexed client,
        string model,
        uint256 tokenCount,
        uint256 timestamp
    );

    event ReceiptRejected(address indexed executor, address indexed client, string model, uint8 reason);

    /// Total tokens recorded for each executor (both paths).
    /// Tokens recorded by the design's unverified path (recordUsage, recordUsageBatch).
    mapping(address => uint256) public totalTokensByExecutor;

    /// Tokens settled with client-signed receipts (settle).
    mapping(address => uint256) public verifiedTokensByExecutor;

    /// Running total of tokens settled per channel keccak256(abi.encode(executor, client, keccak256(model))).
    mapping(bytes32 => uint256) public settledTokens;

    struct Receipt {
        address client;
        string model;
        uint256 promptTokens; // running total of the channel, signed by the client
        uint256 completionTokens; // running total of the channel, signed by the client
        uint256 deadline; // unix time after which the receipt cannot be settled
        bytes32 r; // EIP-2098 compact signature: r, and s with v's parity in its top bit
        bytes32 vs;
    }

    bytes32 public constant RECEIPT_TYPEHASH = keccak256(
        "Receipt(address executor,address client,string model,uint256 promptTokens,uint256 completionTokens,uint256 deadline)"
    );
    bytes32 private constant DOMAIN_TYPEHASH = keccak256(
        "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    );
    bytes32 private constant NAME_HASH = keccak256("lloom Accounting");
    bytes32 private constant VERSION_HASH = keccak256("1");
    uint256 private constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    uint256 private constant HALF_MASK = (1 << 255) - 1;
    uint256 private constant MAX_TOTAL = type(uint128).max;

    uint8 public constant REJECT_BAD_SIGNATURE = 1;
    uint8 public constant REJECT_EXPIRED = 2;
    uint8 public constant REJECT_NOTHING_NEW = 3;
    uint8 public constant REJECT_TOO_LARGE = 4;

    uint256 private immutable cachedChainId;
    bytes32 private immutable cachedDomainSeparator;

    modifier onlyOwner() {
        require(msg.sender == owner, "Not the contract owner");
        _;
    }

    constructor() {
        owner = msg.sender;
        cachedChainId = block.chainid;
        cachedDomainSeparator = _buildDomainSeparator();
    }

    /**
     * @dev The design's path: an executor records one job, unverified.
     * @param client The address of the client who made the request.
     * @param model The name of the model used for the job.
     * @param tokenCount The total number of tokens (prompt + completion).
     */
    function recordUsage(address client, string calldata model, uint256 tokenCount) external {
        require(tokenCount > 0, "Token count must be positive");
        totalTokensByExecutor[msg.sender] += tokenCount;
        emit UsageRecorded(msg.sender, client, model, tokenCount, block.timestamp);
    }

    /**
     * @dev Unverified too, but many records in one call (cheaper per record than
     * recordUsage; still only the executor vouches for the numbers).
     */
    function recordUsageBatch(
        address[] calldata clients,
        string[] calldata models,
        uint256[] calldata tokenCounts
    ) external {
        require(clients.length == models.length && models.length == tokenCounts.length, "Length mismatch");
        uint256 total;
        for (uint256 i = 0; i < clients.length; ++i) {
            require(tokenCounts[i] > 0, "Token count must be positive");
            total += tokenCounts[i];
            emit UsageRecorded(msg.sender, clients[i], models[i], tokenCounts[i], block.timestamp);
        }
        totalTokensByExecutor[msg.sender] += total;
    }

    /// @dev The EIP-712 domain separator (recomputed if the chain id changed, e.g. a fork).
    function domainSeparator() public view returns (bytes32) {
        return block.chainid == cachedChainId ? cachedDomainSeparator : _buildDomainSeparator();
    }

    /// @dev The channel key of (executor, client, model).
    function channelId(address executor, address client, string calldata model) external pure returns (bytes32) {
        return keccak256(abi.encode(executor, client, keccak256(bytes(model))));
    }

    /**
     * @dev Settle client-signed receipts; msg.sender is the executor they name.
     * @return accepted How many receipts recorded new usage.
     */
    function settle(Receipt[] calldata receipts) external returns (uint256 accepted) {
        bytes32 domain = domainSeparator();
        uint256 added;
        for (uint256 i = 0; i < receipts.length; ) {
            Receipt calldata rc = receipts[i];
            unchecked {
                ++i;
            }
            bytes32 modelHash = keccak256(bytes(rc.model));
            uint8 reason = _check(rc, modelHash, domain);
            if (reason != 0) {
                emit ReceiptRejected(msg.sender, rc.client, rc.model, reason);
                continue;
            }
            bytes32 channel = keccak256(abi.encode(msg.sender, rc.client, modelHash));
            uint256 cumulative;
            unchecked {
                cumulative = rc.promptTokens + rc.completionTokens; // both < 2**128
            }
            uint256 settled = settledTokens[channel];
            if (cumulative <= settled) {
                emit ReceiptRejected(msg.sender, rc.client, rc.model, REJECT_NOTHING_NEW);
                continue;
            }
            settledTokens[channel] = cumulative;
            unchecked {
                added += cumulative - settled;
                ++accepted;
            }
            emit UsageSettled(msg.sender, rc.client, rc.model, cumulative - settled, block.timestamp);
        }
        if (added > 0) {
            verifiedTokensByExecutor[msg.sender] += added;
        }
    }

    function _check(Receipt calldata rc, bytes32 modelHash, bytes32 domain) private view returns (uint8) {
        if (rc.deadline < block.timestamp) return REJECT_EXPIRED;
        if (rc.promptTokens > MAX_TOTAL || rc.completionTokens > MAX_TOTAL) return REJECT_TOO_LARGE;
        uint256 s = uint256(rc.vs) & HALF_MASK;
        if (s > HALF_N) return REJECT_BAD_SIGNATURE;
        uint8 v = uint8((uint256(rc.vs) >> 255) + 27);
        bytes32 structHash = keccak256(
            abi.encode(
                RECEIPT_TYPEHASH,
                msg.sender,
                rc.client,
                modelHash,
                rc.promptTokens,
                rc.completionTokens,
                rc.deadline
            )
        );
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", domain, structHash));
        address signer = ecrecover(digest, v, rc.r, bytes32(s));
        if (signer == address(0) || signer != rc.client) return REJECT_BAD_SIGNATURE;
        return 0;
    }

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }
}
